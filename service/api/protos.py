"""Builds the gRPC stubs (service/api/pb/) from proto/ — run by `make setup`, or `python -m service.api.protos`."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
OUT_DIR = Path(__file__).resolve().parent / "pb"


def build() -> None:
    import grpc_tools
    from grpc_tools import protoc

    includes = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        code = protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{includes}", f"--python_out={tmp}",
                            f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *protos])
        if code != 0:
            raise SystemExit(f"protoc failed with exit code {code}")
        OUT_DIR.mkdir(exist_ok=True)
        (OUT_DIR / "__init__.py").write_text('"""Generated from proto/ by service.api.protos; not edited by hand."""\n')
        for generated in Path(tmp).rglob("*_pb2*.py*"):
            # protoc writes absolute imports (`from amserve.v1 import ...`); the stubs live in this package.
            text = re.sub(r"^from amserve\.v1 import", "from service.api.pb import", generated.read_text(), flags=re.M)
            (OUT_DIR / generated.name).write_text(text)


if __name__ == "__main__":
    build()
    sys.exit(0)
