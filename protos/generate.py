"""Regenerate the Python stubs from protos/offsite/v1/*.proto (run: `make protos`).

protoc writes `from offsite.v1 import ...`; the stubs live in the package `offsite.protos.offsite.v1`,
so that one import line is rewritten. tests/test_protos.py checks the committed stubs are current.
"""
from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent


def generate(out_dir: Path) -> list[Path]:
    protos = sorted(str(p.relative_to(HERE)) for p in (HERE / "offsite" / "v1").glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = sorted((out_dir / "offsite" / "v1").glob("*_pb2*.py*"))
    for path in written:
        text = path.read_text().replace("from offsite.v1 import", "from offsite.protos.offsite.v1 import")
        path.write_text(text)
    return written


if __name__ == "__main__":
    for p in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(p)
