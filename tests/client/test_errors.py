"""The SDK's errors, retries and timeouts: typed exceptions from the service's envelope (REST) and
status codes with trailers (gRPC), Retry-After honoured for idempotent calls only, bounded."""

from __future__ import annotations

import asyncio
import functools
import socket
import time

import grpc
import httpx
import numpy as np
import pytest

from amserve_client import (AmserveError, AsyncClient, Client, Conflict, InvalidArgument, NotFound, Overloaded,
                            PayloadTooLarge, Timeout, Unauthorized, Unavailable)
from service.api.auth import create_key
from service.triton.launcher import free_port
from tests.client.conftest import address
from tests.harness import ServerProcess
from tests.helpers import metric_value



def raised(call) -> AmserveError:
    with pytest.raises(AmserveError) as info:
        call()
    return info.value


@pytest.mark.parametrize("server", ["embedded"], indirect=True)  # the API suite's server
def test_errors_are_typed_as_the_envelope_says(sdk, client, transport, bank_name):
    """404, 409, 422: the class, code and field the raw API's envelope names."""
    client.put(f"/v1/banks/{bank_name}", json={"kind": "modern", "dim": 4})
    client.post(f"/v1/banks/{bank_name}/store", json={"patterns": [[1, 0, 0, 0]], "ids": ["a"]})
    code = grpc.StatusCode
    cases = [  # (SDK call, the same request through the raw API, expected class, gRPC status)
        (lambda: sdk.get_bank("nobody-here"), ("GET", "/v1/banks/nobody-here", None), NotFound, code.NOT_FOUND),
        (lambda: sdk.delete_pattern(bank_name, "zz"), ("DELETE", f"/v1/banks/{bank_name}/patterns/zz", None),
         NotFound, code.NOT_FOUND),
        (lambda: sdk.create_bank(bank_name, "modern", 4),
         ("PUT", f"/v1/banks/{bank_name}", {"kind": "modern", "dim": 4}), Conflict, code.ALREADY_EXISTS),
        (lambda: sdk.store(bank_name, [0, 1, 0, 0], ids=["a"]),
         ("POST", f"/v1/banks/{bank_name}/store", {"patterns": [[0, 1, 0, 0]], "ids": ["a"]}), Conflict,
         code.FAILED_PRECONDITION),
        (lambda: sdk.retrieve(bank_name, [[1, 0, 0]]),
         ("POST", f"/v1/banks/{bank_name}/retrieve", {"queries": [[1, 0, 0]]}), InvalidArgument,
         code.INVALID_ARGUMENT),
        (lambda: sdk.create_bank(bank_name + "x", "nonsense", 4),
         ("PUT", f"/v1/banks/{bank_name}x", {"kind": "nonsense", "dim": 4}), InvalidArgument, code.INVALID_ARGUMENT),
        (lambda: sdk.generate("hi", temperature=-1), ("POST", "/v1/generate", {"prompt": "hi", "temperature": -1}),
         InvalidArgument, code.INVALID_ARGUMENT),
    ]
    for call, (method, path, body), kind, grpc_status in cases:
        error, raw = raised(call), client.request(method, path, json=body)
        assert type(error) is kind, (error, raw.text)
        envelope = raw.json()["error"]
        assert (error.code, error.field) == (envelope["code"], envelope.get("field")), (error, envelope)
        assert envelope["message"] in error.message
        assert error.status == (raw.status_code if transport == "rest" else grpc_status)
        assert error.retry_after is None
    nan = raised(lambda: sdk.retrieve(bank_name, [[1, np.nan, 0, 0]]))
    assert type(nan) is InvalidArgument and nan.field.startswith("queries[0]")


# ----- a server of its own: API keys, a small body limit, a queue of two ------------------------


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    """(server, key, slow bank): retrieves on the bank take milliseconds, so concurrent ones pile up."""
    root = tmp_path_factory.mktemp("sdk-strict")
    key = create_key(root / "keys.json", "acme")
    args = ["--api-keys-file", str(root / "keys.json"), "--model", "none", "--max-body-bytes", "200000",
            "--max-queue-size", "2", "--max-batch-size", "1"]
    with ServerProcess(root / "data", extra_args=args) as proc:
        with Client(proc.url, key) as sdk:
            sdk.create_bank("slow", "rbf", 64, {"beta": 0.01})
            sdk.store("slow", np.random.default_rng(0).standard_normal((200, 64)))
        yield proc, key


SLOW = {"steps": 300, "tolerance": 1e-9}


def test_unauthorized_without_a_valid_key(strict, transport):
    server, key = strict
    for wrong in (None, "ams_wrong"):
        with Client(address(server, transport), wrong, transport=transport) as sdk:
            error = raised(sdk.list_banks)
        assert type(error) is Unauthorized and error.code == "unauthenticated"
    with Client(address(server, transport), key, transport=transport) as sdk:
        assert [b.name for b in sdk.list_banks()] == ["slow"]


def test_payload_too_large(strict, transport):
    server, key = strict
    with Client(address(server, transport), key, transport=transport) as sdk:
        error = raised(lambda: sdk.store("slow", np.ones((1000, 64)), ids=[f"x{i}" for i in range(1000)]))
        assert type(error) is PayloadTooLarge
        assert error.status == (413 if transport == "rest" else grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert sdk.get_bank("slow").count == 200


def flood(server, key, transport: str, retries: int, calls: int = 16) -> list:
    """`calls` concurrent slow retrieves through one AsyncClient: their results or errors."""
    async def main() -> list:
        async with AsyncClient(address(server, transport), key, transport=transport, retries=retries) as sdk:
            return await asyncio.gather(*(sdk.retrieve("slow", np.full(64, 0.1), **SLOW) for _ in range(calls)),
                                        return_exceptions=True)
    return asyncio.run(main())


def rejected(server) -> float:
    return metric_value(httpx.get(f"{server.url}/metrics").text, "amserve_rejections_total", reason="queue_full") or 0


def test_a_full_queue_is_overloaded_with_retry_after(strict, transport):
    server, key = strict
    outcomes = flood(server, key, transport, retries=0)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert errors and len(errors) < len(outcomes), outcomes
    for error in errors:
        assert type(error) is Overloaded, error
        assert (error.code, error.retry_after) == ("overloaded", 1.0)
        assert error.status == (503 if transport == "rest" else grpc.StatusCode.UNAVAILABLE)


def test_idempotent_calls_are_retried_after_retry_after(strict, transport):
    server, key = strict
    before = rejected(server)
    started = time.monotonic()
    outcomes = flood(server, key, transport, retries=8)
    assert all(len(o) == 1 and o[0].state.shape == (64,) for o in outcomes), outcomes
    assert rejected(server) > before, "nothing was turned away, so nothing was retried"
    assert time.monotonic() - started >= 1.0  # the Retry-After was waited for


# ----- retry policy, against a scripted service -------------------------------------------------

RESULT = {"results": [{"state": [1.0, 0.0], "energy": -1.0, "steps": 1, "converged": True,
                       "nearest": {"id": "a", "similarity": 1.0}, "trace": None}]}
STORED = {"ids": ["a"], "count": 1, "version": 1}


def scripted(*answers: httpx.Response, retries: int = 3) -> tuple[Client, list[httpx.Request]]:
    """A Client whose service answers `answers` in turn (the last one from then on), and the requests it got."""
    requests: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return answers[min(len(requests), len(answers)) - 1]
    return Client("http://amserve.test", retries=retries,
                  http_client=httpx.Client(transport=httpx.MockTransport(answer))), requests


def overloaded(retry_after: str | None = "0") -> httpx.Response:
    return httpx.Response(503, json={"error": {"code": "overloaded", "message": "queue full"}},
                          headers={} if retry_after is None else {"Retry-After": retry_after})


def test_retry_waits_the_retry_after_then_succeeds():
    sdk, requests = scripted(overloaded("1"), httpx.Response(200, json=RESULT))
    started = time.monotonic()
    [result] = sdk.retrieve("b", [1, 0])
    assert time.monotonic() - started >= 1.0 and len(requests) == 2
    np.testing.assert_array_equal(result.state, [1, 0])


def test_only_idempotent_calls_are_retried():
    for call, answer, tries in [
        (lambda sdk: sdk.store("b", [1, 0]), STORED, 1),  # without ids a retry could store twice
        (lambda sdk: sdk.store("b", [1, 0], ids=["a"]), STORED, 2),
        (lambda sdk: sdk.create_bank("b", "modern", 2), {}, 1),
        (lambda sdk: sdk.delete_bank("b"), {}, 1),
        (lambda sdk: sdk.generate("hi"), {}, 1),
        (lambda sdk: sdk.get_bank("b"), {"name": "b", "kind": "modern", "dim": 2, "params": {}, "count": 0,
                                         "bytes": 0}, 2),
    ]:
        sdk, requests = scripted(overloaded(), httpx.Response(200, json=answer))
        if tries == 1:
            assert type(raised(functools.partial(call, sdk))) is Overloaded
        else:
            call(sdk)
        assert len(requests) == tries, requests[0].url


def test_retries_are_bounded_and_only_for_what_the_service_did_not_do():
    sdk, requests = scripted(overloaded(), retries=2)
    assert type(raised(lambda: sdk.retrieve("b", [1, 0]))) is Overloaded and len(requests) == 3
    sdk, requests = scripted(httpx.Response(404, json={"error": {"code": "not_found", "message": "no bank",
                                                                 "field": "bank"}}))
    assert type(raised(lambda: sdk.retrieve("b", [1, 0]))) is NotFound and len(requests) == 1
    # no envelope (a proxy's page): the status decides, a 502 is worth another try
    sdk, requests = scripted(httpx.Response(502, text="<html>bad gateway</html>"), httpx.Response(200, json=RESULT))
    assert len(sdk.retrieve("b", [1, 0])) == 1 and len(requests) == 2
    sdk, _ = scripted(httpx.Response(502, text="<html>bad gateway</html>"), retries=0)
    error = raised(lambda: sdk.list_banks())
    assert (type(error), error.code, error.status, error.message) == (Unavailable, "http_502", 502,
                                                                      "<html>bad gateway</html>")


# ----- timeouts and an unreachable service ------------------------------------------------------


@pytest.fixture()
def silent_port():
    """A port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_no_answer_in_time_is_a_timeout_and_not_retried(silent_port, transport):
    url = f"http://127.0.0.1:{silent_port}" if transport == "rest" else f"127.0.0.1:{silent_port}"
    with Client(url, transport=transport, timeout=0.3, retries=3) as sdk:
        started = time.monotonic()
        error = raised(sdk.list_banks)
        assert type(error) is Timeout
        assert 0.25 <= time.monotonic() - started < 0.9  # one try: the request may have run


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_an_unreachable_service_is_unavailable_after_bounded_retries(transport):
    port = free_port()
    url = f"http://127.0.0.1:{port}" if transport == "rest" else f"127.0.0.1:{port}"
    with Client(url, transport=transport, timeout=5, retries=2) as sdk:
        started = time.monotonic()
        error = raised(sdk.list_banks)
        assert type(error) is Unavailable and error.retry_after is None
        assert time.monotonic() - started < 3


@pytest.mark.parametrize(("options", "complaint"), [
    ({"transport": "smtp"}, "transport"),
    ({"url": "127.0.0.1:8000"}, "http://"),  # a gRPC-style target given to REST
    ({"encoding_format": "int8"}, "encoding_format"),
    ({"transport": "grpc", "http_client": httpx.Client()}, "http_client"),
])
def test_bad_client_arguments_fail_at_construction(options, complaint):
    with pytest.raises(ValueError, match=complaint):
        Client(**options)
