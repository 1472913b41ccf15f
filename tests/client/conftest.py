"""The SDK against live servers, over both transports: the API suite's embedded server for the
operations (each module asks for it), and servers of their own where other settings are needed."""

from __future__ import annotations

import pytest

from amserve_client import Client

TRANSPORTS = ["rest", "grpc"]


def address(server, transport: str) -> str:
    return server.url if transport == "rest" else server.grpc_target


@pytest.fixture(params=TRANSPORTS)
def transport(request) -> str:
    return request.param


@pytest.fixture()
def sdk(server, transport):
    with Client(address(server, transport), transport=transport, timeout=60) as amserve:
        yield amserve
