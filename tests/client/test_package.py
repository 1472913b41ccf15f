"""amserve-client as a package: its committed gRPC stubs describe proto/ as it is, it needs neither
torch nor the server, and its wheel carries the stubs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import grpc
import grpc_tools
from google.protobuf import descriptor_pb2
from grpc_tools import protoc

from amserve_client._pb import amserve_pb2, amserve_pb2_grpc
from service.api.protos import PROTO_DIR
from tests.harness import ROOT

CLIENT = ROOT / "client"


def compiled(proto: str) -> descriptor_pb2.FileDescriptorProto:
    """`proto` as protoc reads it now."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        includes = Path(grpc_tools.__file__).parent / "_proto"
        assert protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{includes}", f"--descriptor_set_out={out}", proto]) == 0
        [descriptor] = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    clear_json_names(descriptor.message_type)  # protoc fills them in a descriptor set, generated code leaves them out
    return descriptor


def clear_json_names(messages) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        clear_json_names(message.nested_type)


def test_the_committed_stubs_are_those_of_the_proto():
    """Fails when proto/ changed and the client's stubs were not rebuilt (`make proto`)."""
    committed = descriptor_pb2.FileDescriptorProto.FromString(amserve_pb2.DESCRIPTOR.serialized_pb)
    assert committed == compiled(amserve_pb2.DESCRIPTOR.name), "client/amserve_client/_pb is behind proto/: make proto"
    # and the grpc module is generated from that same service
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        stub = amserve_pb2_grpc.AmserveStub(channel)
        methods = {m.name for m in amserve_pb2.DESCRIPTOR.services_by_name["Amserve"].methods}
        assert {name for name in vars(stub) if not name.startswith("_")} == methods


def test_imports_neither_torch_nor_the_server(tmp_path):
    check = ("import sys, amserve_client; "
             "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'service', 'tritonclient')); "
             "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_the_wheel_carries_the_stubs_and_no_server_dependency(tmp_path):
    source = tmp_path / "client"  # a copy: building writes build/ beside the sources
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(source)], check=True, timeout=300)
    [wheel] = tmp_path.glob("amserve_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    package = {n for n in names if not n.startswith("amserve_client-")}
    sources = {p.relative_to(CLIENT).as_posix() for p in (CLIENT / "amserve_client").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert package == sources
    assert {"amserve_client/_pb/amserve_pb2.py", "amserve_client/_pb/amserve_pb2_grpc.py",
            "amserve_client/_pb/amserve_pb2.pyi", "amserve_client/py.typed"} <= package
    requires = {line.split(":", 1)[1].strip().split(">")[0].split("<")[0] for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")}
    assert requires == {"httpx", "numpy", "grpcio", "protobuf"}
