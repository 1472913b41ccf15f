from __future__ import annotations

import re
import uuid

import grpc
import httpx
import pytest

from tests.harness import ServerProcess

BACKENDS = ["embedded", "triton"]


@pytest.fixture(scope="session", params=BACKENDS)
def server(request, tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp(f"data-{request.param}"), backend=request.param) as proc:
        yield proc


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60.0) as c:
        yield c


@pytest.fixture()
def stub(server):
    from service.api.pb import amserve_pb2_grpc

    with grpc.insecure_channel(server.grpc_target) as channel:
        yield amserve_pb2_grpc.AmserveStub(channel)


@pytest.fixture()
def bank_name(request) -> str:
    """A fresh bank name per test, valid under the bank-name rule."""
    return re.sub(r"[^a-z0-9_-]", "-", "t-" + request.node.name.lower())[:50] + uuid.uuid4().hex[:6]


@pytest.fixture()
def embedded_only(server):
    """For tests of the gateway's own machinery that the triton backend hands to Triton instead."""
    if server.backend != "embedded":
        pytest.skip(f"checks the embedded backend's own batcher; {server.backend} batches inside Triton")
