"""The data plane's short path (service.api.middleware.FrontDoor): store, retrieve and complete
answered without FastAPI's router, everything else (and every body it would not take) through it."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRouter
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY, generate_latest

from service import errors
from service.api import schemas
from service.api.auth import ApiKeys, key_hash
from service.api.rest import create_app
from tests.helpers import metric_value

KEY = "ams_test-key"


class RecordingOperations:
    """What the memory endpoints call, recorded; `missing` banks raise NotFound as the real ones do."""

    def __init__(self, missing: str = "gone"):
        self.calls: list[tuple] = []
        self.missing = missing

    async def retrieve(self, tenant, bank, request):
        self.calls.append(("retrieve", tenant, bank, request))
        if bank == self.missing:
            raise errors.NotFound(f"no bank {bank!r}")
        return schemas.RetrieveResponse(results=[])


def paths_entering(monkeypatch, app_class: type) -> list[str]:
    """The paths of the HTTP requests that `app_class`'s instances are called with, from now on."""
    calls: list[str] = []
    call = app_class.__call__

    async def counting(self, scope, receive, send):
        if scope["type"] == "http":
            calls.append(scope["path"])
        return await call(self, scope, receive, send)
    monkeypatch.setattr(app_class, "__call__", counting)
    return calls


@pytest.fixture()
def router_calls(monkeypatch) -> list[str]:
    """The paths FastAPI's router was asked to route."""
    return paths_entering(monkeypatch, APIRouter)


def requests_answered(route: str, status: int) -> float:
    """From the process's registry: reading the app's /metrics would go through its router."""
    text = generate_latest().decode()
    return metric_value(text, "amserve_requests_total", route=route, transport="rest", status=str(status)) or 0.0


def test_a_valid_retrieve_skips_the_router_and_is_measured_under_its_route(router_calls):
    ops = RecordingOperations()
    before = requests_answered("/v1/banks/{bank}/retrieve", 200)
    with TestClient(create_app(ops)) as client:
        answer = client.post("/v1/banks/notes/retrieve", json={"queries": [[1.0, 0.0]], "steps": 2})
    assert (answer.status_code, answer.json()) == (200, {"results": []})
    [(operation, tenant, bank, request)] = ops.calls
    assert (operation, tenant, bank, request.steps, request.queries) == ("retrieve", None, "notes", 2, [[1.0, 0.0]])
    assert router_calls == []
    assert requests_answered("/v1/banks/{bank}/retrieve", 200) == before + 1


def test_a_valid_retrieve_skips_fastapis_own_middleware_too(monkeypatch):
    """The front door sits in front of FastAPI (rest.Gateway), not inside its middleware stack."""
    entered = paths_entering(monkeypatch, FastAPI)
    with TestClient(create_app(RecordingOperations())) as client:
        assert client.post("/v1/banks/notes/retrieve", json={"queries": [[1.0, 0.0]]}).status_code == 200
        assert client.get("/healthz/live").status_code == 200
    assert entered == ["/healthz/live"]


def test_the_in_flight_gauge_counts_the_requests_in_progress_when_scraped():
    def in_flight() -> float:
        return REGISTRY.get_sample_value("amserve_requests_in_flight", {"transport": "rest"})

    class Observing(RecordingOperations):
        async def retrieve(self, tenant, bank, request):
            self.calls.append(in_flight())
            return schemas.RetrieveResponse(results=[])

    ops = Observing()
    with TestClient(create_app(ops)) as client:
        assert client.post("/v1/banks/notes/retrieve", json={"queries": [[1.0, 0.0]]}).status_code == 200
        assert client.put("/v1/banks/notes", content=b"{").status_code == 422  # through FastAPI too
        assert in_flight() == 0
    assert ops.calls == [1]


def test_a_body_that_does_not_validate_goes_on_to_fastapi_with_its_body(router_calls):
    ops = RecordingOperations()
    with TestClient(create_app(ops)) as client:
        answer = client.post("/v1/banks/notes/retrieve", json={"queries": [[1.0, 0.0]], "steps": "2"})
    assert answer.status_code == 422
    assert answer.json()["error"]["field"] == "steps"
    assert router_calls == ["/v1/banks/notes/retrieve"] and ops.calls == []


def test_other_routes_and_media_types_go_through_fastapi(router_calls):
    with TestClient(create_app(RecordingOperations())) as client:
        assert client.get("/healthz/live").status_code == 200
        answer = client.post("/v1/banks/notes/retrieve", content=b'{"queries": [[1.0]]}',
                             headers={"content-type": "text/plain"})
    assert answer.status_code == 422
    assert router_calls == ["/healthz/live", "/v1/banks/notes/retrieve"]


def test_service_errors_and_missing_keys_answer_in_the_envelope_without_the_router(router_calls):
    ops = RecordingOperations()
    app = create_app(ops, api_keys=ApiKeys({key_hash(KEY): "acme"}))
    with TestClient(app) as client:
        unauthorised = client.post("/v1/banks/notes/retrieve", json={"queries": [[1.0]]})
        missing = client.post("/v1/banks/gone/retrieve", json={"queries": [[1.0]]},
                              headers={"authorization": f"Bearer {KEY}"})
    assert unauthorised.status_code == 401 and unauthorised.headers["www-authenticate"] == "Bearer"
    assert unauthorised.json()["error"]["code"] == "unauthenticated"
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert [(call[0], call[1], call[2]) for call in ops.calls] == [("retrieve", "acme", "gone")]
    assert router_calls == []


def test_the_first_of_repeated_headers_counts_as_in_fastapi(router_calls):
    ops = RecordingOperations()
    app = create_app(ops, api_keys=ApiKeys({key_hash(KEY): "acme"}))
    with TestClient(app) as client:
        answer = client.post("/v1/banks/notes/retrieve", content=b'{"queries": [[1.0]]}', headers=[
            ("content-type", "text/plain"), ("content-type", "application/json"),
            ("authorization", f"Bearer {KEY}"), ("authorization", "Bearer ams_other")])
    assert answer.status_code == 422 and answer.json()["error"]["field"] == "body"
    assert router_calls == ["/v1/banks/notes/retrieve"] and ops.calls == []
