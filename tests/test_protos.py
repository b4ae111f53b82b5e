"""The committed stubs are what protos/generate.py makes from the .proto, and pyproject.toml's ranges admit
only the grpcio and protobuf runtimes those stubs accept at import."""
import importlib.util
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
STUBS = ROOT / "protos" / "offsite" / "v1"

# The generator's own version, written into the stubs: a newer grpcio-tools or protobuf stamps another one
# without changing the code, so the comparison leaves the stamps out and the floor test below checks them.
STAMPS = [
    (re.compile(r"GRPC_GENERATED_VERSION = '[^']*'"), "GRPC_GENERATED_VERSION = <stamp>"),
    (re.compile(r"# Protobuf Python Version: \S+"), "# Protobuf Python Version: <stamp>"),
    (re.compile(r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,"),
     r"\1 <stamp>,"),
]


def unstamped(text: str) -> str:
    for pattern, replacement in STAMPS:
        text = pattern.sub(replacement, text)
    return text


def test_committed_stubs_match_the_proto(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", ROOT / "protos" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    fresh = generate.generate(tmp_path)
    assert fresh, "protoc produced nothing"
    for path in fresh:
        committed = STUBS / path.name
        assert unstamped(committed.read_text()) == unstamped(path.read_text()), f"{committed} is stale: run `make protos`"


def test_the_stamps_are_what_the_comparison_leaves_out():
    grpc_stub = (STUBS / "coordinator_pb2_grpc.py").read_text()
    pb2 = (STUBS / "coordinator_pb2.py").read_text()
    for text in (grpc_stub, pb2):
        assert "<stamp>" in unstamped(text)
    assert unstamped(grpc_stub.replace("GRPC_GENERATED_VERSION = '", "GRPC_GENERATED_VERSION = '9")) == unstamped(grpc_stub)
    assert unstamped(pb2.replace("import", "import ")) != unstamped(pb2), "a change of code is not a stamp"


def _floor(name: str) -> Version:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == name]
    floors = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert floors, f"pyproject.toml gives {name} no lower bound"
    return max(floors)


def test_pyproject_admits_only_runtimes_the_stubs_accept():
    """The stubs refuse, at import, a grpcio or protobuf older than the generator that made them: a library
    install within pyproject's ranges must never get one."""
    grpc_stub = (STUBS / "coordinator_pb2_grpc.py").read_text()
    grpc_needs = Version(re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", grpc_stub).group(1))
    pb2 = (STUBS / "coordinator_pb2.py").read_text()
    pb_needs = Version(".".join(re.search(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),", pb2).groups()))
    assert _floor("grpcio") >= grpc_needs, f"pyproject.toml: grpcio>={grpc_needs} (the stubs need it)"
    assert _floor("protobuf") >= pb_needs, f"pyproject.toml: protobuf>={pb_needs} (the stubs need it)"


def test_every_rpc_documents_its_status_codes():
    text = (STUBS / "coordinator.proto").read_text()
    blocks = text.split("rpc ")[1:]
    assert len(blocks) == 8
    before = text.split("rpc ")
    for i, block in enumerate(blocks):
        comment = before[i].rsplit("}", 1)[-1] if i else before[0].split("service Coordinator {")[-1]
        assert "UNAUTHENTICATED" in comment, f"rpc {block.split('(')[0]} lacks its status codes"
