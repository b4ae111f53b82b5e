"""The committed stubs are exactly what protos/generate.py makes from the .proto."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_committed_stubs_match_the_proto(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    fresh = generate.generate(tmp_path)
    assert fresh, "protoc produced nothing"
    for path in fresh:
        committed = ROOT / "protos" / "offsite" / "v1" / path.name
        assert committed.read_text() == path.read_text(), f"{committed} is stale: run `make protos`"


def test_every_rpc_documents_its_status_codes():
    text = (ROOT / "protos" / "offsite" / "v1" / "coordinator.proto").read_text()
    blocks = text.split("rpc ")[1:]
    assert len(blocks) == 8
    before = text.split("rpc ")
    for i, block in enumerate(blocks):
        comment = before[i].rsplit("}", 1)[-1] if i else before[0].split("service Coordinator {")[-1]
        assert "UNAUTHENTICATED" in comment, f"rpc {block.split('(')[0]} lacks its status codes"
