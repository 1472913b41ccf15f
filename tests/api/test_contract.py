"""The REST answers and the OpenAPI document agree: errors FastAPI and Starlette raise themselves come in the
service's envelope, and the document lists each operation's statuses, content types and links."""

from __future__ import annotations

import httpx
import pytest

ENVELOPE_KEYS = {"code", "message"}


def envelope(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and ENVELOPE_KEYS <= set(body["error"]) <= ENVELOPE_KEYS | {"field"}, body
    return body["error"]


@pytest.mark.parametrize("body", [b'{"patterns": [[1, 0]', b'{"patterns": "\xff"}'], ids=["truncated", "not-utf8"])
def test_a_malformed_body_is_400_in_the_envelope(client, bank_name, body):
    response = client.post(f"/v1/banks/{bank_name}/store", content=body, headers={"content-type": "application/json"})
    error = envelope(response, 400)
    assert error["code"] == "invalid_argument" and error["field"] == "body"


def test_an_unknown_route_is_404_in_the_envelope(client):
    assert envelope(client.get("/v1/nothing-here"), 404)["code"] == "not_found"


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("PATCH", "/v1/banks/somebank", "DELETE, GET, PUT"),  # three routes share the path
    ("POST", "/v1/banks", "GET"),
    ("GET", "/v1/banks/somebank/store", "POST"),
    ("DELETE", "/v1/generate", "POST"),
    ("POST", "/docs/assets/swagger-ui.css", "GET, HEAD"),
])
def test_a_wrong_method_is_405_naming_every_method_of_the_path(client, method, path, allowed):
    response = client.request(method, path)
    assert envelope(response, 405)["code"] == "method_not_allowed"
    assert response.headers["allow"] == allowed


@pytest.mark.parametrize(("field", "value"), [("logprobs", False), ("max_tokens", "4"), ("temperature", "0"),
                                              ("stream", 0)])
def test_values_of_another_json_type_are_refused_as_the_schema_says(client, field, value):
    response = client.post("/v1/generate", json={"prompt": "a", "max_tokens": 1, field: value})
    assert envelope(response, 422)["field"] == field


@pytest.fixture(scope="module")
def document(server):
    return httpx.get(f"{server.url}/openapi.json").json()


def operations(document: dict) -> dict[str, dict]:
    return {op["operationId"]: op for methods in document["paths"].values() for op in methods.values()}


@pytest.mark.parametrize(("operation_id", "statuses"), [
    ("create_bank", {201, 400, 401, 409, 413, 422, 503}),
    ("list_banks", {200, 401, 503}),
    ("get_bank", {200, 401, 404, 422, 503}),
    ("delete_bank", {204, 401, 404, 422, 503}),
    ("store", {200, 400, 401, 404, 409, 413, 422, 503}),
    ("delete_pattern", {204, 401, 404, 422, 503}),
    ("retrieve", {200, 400, 401, 404, 409, 413, 422, 503}),
    ("complete", {200, 400, 401, 404, 409, 413, 422, 503}),
    ("complete_image", {200, 400, 401, 413, 422, 503}),
    ("list_models", {200, 401, 503}),
    ("generate", {200, 400, 401, 413, 422, 429, 503}),
    ("completions", {200, 400, 401, 404, 413, 422, 429, 503}),
    ("ready", {200, 503}),
    ("prometheus", {200, 401}),
])
def test_the_document_lists_every_status_of_each_operation(document, operation_id, statuses):
    responses = operations(document)[operation_id]["responses"]
    assert {int(status) for status in responses} == statuses
    for status, response in responses.items():
        if int(status) >= 400 and operation_id != "ready":
            assert response["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}


def test_every_operation_past_the_probes_declares_the_api_key(document):
    for operation_id, operation in operations(document).items():
        guarded = operation_id not in {"live", "ready", "prometheus"}
        assert ("security" in operation) == guarded, operation_id
    scheme = document["components"]["securitySchemes"]["ApiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")


@pytest.mark.parametrize(("operation_id", "content_types"), [
    ("generate", {"application/json", "text/event-stream"}),
    ("completions", {"application/json", "text/event-stream"}),
    ("prometheus", {"text/plain"}),
    ("retrieve", {"application/json"}),
])
def test_the_document_names_every_content_type_of_a_success(document, operation_id, content_types):
    assert set(operations(document)[operation_id]["responses"]["200"]["content"]) == content_types


def test_bank_creation_links_to_the_banks_operations(document):
    by_id = operations(document)
    created = by_id["create_bank"]["responses"]["201"]["links"]
    assert set(created) == {"get_bank", "store", "retrieve", "complete", "delete_bank"}
    for link in created.values():
        assert link["operationId"] in by_id
        assert link["parameters"] == {"bank": "$response.body#/name"}
    stored = by_id["store"]["responses"]["200"]["links"]
    assert stored["delete_pattern"]["parameters"] == {"bank": "$request.path.bank", "pattern_id": "$response.body#/ids/0"}

