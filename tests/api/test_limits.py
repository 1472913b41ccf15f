"""Limits and overload over real sockets: oversize body → 413, too many vectors → 422,
full queue → 503 + Retry-After (REST) / UNAVAILABLE (gRPC), and nothing admitted is dropped."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import numpy as np
import pytest

from service.api.pb import amserve_pb2 as pb
from service.api.pb import amserve_pb2_grpc as pb_grpc
from tests.harness import ServerProcess
from tests.helpers import metric_value


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory):
    args = ["--max-body-bytes", "200000", "--max-vectors-per-request", "50",
            "--max-queue-size", "2", "--max-batch-size", "1"]
    with ServerProcess(tmp_path_factory.mktemp("tight"), extra_args=args) as proc:
        yield proc


@pytest.fixture(scope="module")
def slow_bank(tight_server):
    """An rbf bank whose retrieve takes milliseconds, so concurrent requests pile up in the queue."""
    rng = np.random.default_rng(0)
    with httpx.Client(base_url=tight_server.url, timeout=60) as c:
        assert c.put("/v1/banks/slow", json={"kind": "rbf", "dim": 64, "params": {"beta": 0.01}}).status_code == 201
        for _ in range(4):
            r = c.post("/v1/banks/slow/store", json={"patterns": rng.standard_normal((50, 64)).tolist()})
            assert r.status_code == 200, r.text
    return "slow"


def test_oversize_body_is_413(tight_server, slow_bank):
    body = b'{"patterns": [[' + b",".join([b"0.5"] * 64) + b"]]" + b" " * 250_000 + b"}"
    url = f"{tight_server.url}/v1/banks/{slow_bank}/store"
    headers = {"content-type": "application/json"}
    declared = httpx.post(url, content=body, headers=headers, timeout=30)

    def chunks():  # no Content-Length: the limit is enforced while reading
        for start in range(0, len(body), 16384):
            yield body[start:start + 16384]
    streamed = httpx.post(url, content=chunks(), headers=headers, timeout=30)
    for r in (declared, streamed):
        assert r.status_code == 413, r.text
        assert r.json()["error"]["field"] == "body"
    assert httpx.get(f"{tight_server.url}/v1/banks/{slow_bank}").json()["count"] == 200


def test_too_many_vectors_is_422(tight_server, slow_bank):
    r = httpx.post(f"{tight_server.url}/v1/banks/{slow_bank}/retrieve", json={"queries": [[0.0] * 64] * 51}, timeout=30)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "queries"
    assert "limit of 50" in r.json()["error"]["message"]


def test_full_queue_answers_503_with_retry_after_and_serves_the_rest(tight_server, slow_bank):
    query = {"queries": [[0.1] * 64], "steps": 300, "tolerance": 1e-9}

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=tight_server.url, timeout=120) as c:
            return await asyncio.gather(*(c.post(f"/v1/banks/{slow_bank}/retrieve", json=query) for _ in range(24)))

    responses = asyncio.run(flood())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected and statuses.count(200) >= 2, statuses  # at least the queue's worth is served
    for r in rejected:
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["code"] == "overloaded"
    for r in responses:
        if r.status_code == 200:
            assert len(r.json()["results"][0]["state"]) == 64


def test_full_queue_is_unavailable_over_grpc(tight_server, slow_bank):
    request = pb.RetrieveRequest(bank=slow_bank, queries=[pb.Vector(values=[0.1] * 64)], steps=300, tolerance=1e-9)

    async def flood() -> list:
        async with grpc.aio.insecure_channel(tight_server.grpc_target) as channel:
            stub = pb_grpc.AmserveStub(channel)

            async def one():
                try:
                    return await stub.Retrieve(request)
                except grpc.aio.AioRpcError as exc:
                    return exc
            return await asyncio.gather(*(one() for _ in range(24)))

    outcomes = asyncio.run(flood())
    errors = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert errors and len(errors) < len(outcomes)
    assert {e.code() for e in errors} == {grpc.StatusCode.UNAVAILABLE}


def test_in_flight_limit_sheds_load_before_reading_bodies(tmp_path):
    """Past --max-in-flight requests in progress, REST answers 503 + Retry-After at once."""
    rng = np.random.default_rng(2)
    with ServerProcess(tmp_path / "data", extra_args=["--model", "none", "--max-in-flight", "2"]) as server:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            c.put("/v1/banks/slow", json={"kind": "rbf", "dim": 64, "params": {"beta": 0.01}}).raise_for_status()
            c.post("/v1/banks/slow/store", json={"patterns": rng.standard_normal((500, 64)).tolist()}).raise_for_status()
        # tiny steps: thousands of them, each lowering the energy, so each request takes a while
        query = {"queries": [[0.1] * 64], "steps": 3000, "step_size": 1e-3, "tolerance": 1e-12}

        async def flood() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
                return await asyncio.gather(*(c.post("/v1/banks/slow/retrieve", json=query) for _ in range(12)))

        responses = asyncio.run(flood())
        shed = [r for r in responses if r.status_code == 503]
        assert shed and all(r.status_code in (200, 503) for r in responses)
        assert all(r.headers["Retry-After"] and r.json()["error"]["code"] == "overloaded" for r in shed)
        assert httpx.get(f"{server.url}/healthz/ready").status_code == 200  # probes are never shed
        rejected = metric_value(httpx.get(f"{server.url}/metrics").text, "amserve_rejections_total",
                                reason="in_flight_limit")
        assert rejected == len(shed)
