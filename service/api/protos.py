"""Builds the gRPC stubs from proto/: the server's (service/api/pb/) — run by `make setup`, or
`python -m service.api.protos` — and with `--client` also the client's (client/amserve_client/_pb/),
which are committed so that `pip install ./client` needs no protoc (`make proto` rebuilds both)."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
OUT_DIR = Path(__file__).resolve().parent / "pb"
CLIENT_PACKAGE = "amserve_client._pb"
CLIENT_DIR = ROOT / "client" / "amserve_client" / "_pb"


def generate(package: str) -> dict[str, str]:
    """{file name: text} of the stubs for every proto/ file, importing each other from `package`."""
    import grpc_tools
    from grpc_tools import protoc

    includes = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    files = {"__init__.py": '"""Generated from proto/ by service.api.protos; not edited by hand."""\n'}
    with tempfile.TemporaryDirectory() as tmp:
        code = protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{includes}", f"--python_out={tmp}",
                            f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *protos])
        if code != 0:
            raise SystemExit(f"protoc failed with exit code {code}")
        for generated in Path(tmp).rglob("*_pb2*.py*"):
            # protoc writes absolute imports (`from amserve.v1 import ...`); the stubs live in `package`.
            files[generated.name] = re.sub(r"^from amserve\.v1 import", f"from {package} import",
                                           generated.read_text(), flags=re.M)
    return files


def write(out_dir: Path, files: dict[str, str]) -> None:
    out_dir.mkdir(exist_ok=True)
    for name, text in files.items():
        (out_dir / name).write_text(text)


def build() -> None:
    write(OUT_DIR, generate("service.api.pb"))


if __name__ == "__main__":
    build()
    if "--client" in sys.argv[1:]:
        write(CLIENT_DIR, generate(CLIENT_PACKAGE))
    sys.exit(0)
