"""Every REST endpoint over a real socket: success paths against exact computation, every error path."""

from __future__ import annotations

import numpy as np
import pytest


def create(client, name, kind="modern", dim=8, **params):
    r = client.put(f"/v1/banks/{name}", json={"kind": kind, "dim": dim, "params": params})
    assert r.status_code == 201, r.text
    return r.json()


def error(r, status: int, field: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] and body["message"]
    if field is not None:
        assert body.get("field") == field, body
    return body


def test_bank_lifecycle(client, bank_name):
    info = create(client, bank_name, "modern", 8, beta=4.0)
    (shard,) = info.pop("shards")  # unsharded: one shard, on every replica
    assert shard["shard"] == 0 and shard["count"] == 0 and shard["replicas"]
    assert info == {"name": bank_name, "kind": "modern", "dim": 8, "params": {"beta": 4.0}, "count": 0, "bytes": 0,
                    "version": 0, "checksum": "0" * 16}
    error(client.put(f"/v1/banks/{bank_name}", json={"kind": "modern", "dim": 8}), 409, "bank")
    assert bank_name in [b["name"] for b in client.get("/v1/banks").json()["banks"]]
    assert client.get(f"/v1/banks/{bank_name}").json()["kind"] == "modern"
    assert client.delete(f"/v1/banks/{bank_name}").status_code == 204
    error(client.get(f"/v1/banks/{bank_name}"), 404, "bank")
    error(client.delete(f"/v1/banks/{bank_name}"), 404, "bank")
    assert bank_name not in [b["name"] for b in client.get("/v1/banks").json()["banks"]]


def test_store_is_idempotent_per_id_and_counts_bytes(client, bank_name):
    create(client, bank_name, "modern", 4)
    patterns = [[1, 0, 0, 0], [0, 1, 0, 0]]
    r = client.post(f"/v1/banks/{bank_name}/store", json={"patterns": patterns, "ids": ["a", "b"]})
    assert r.json() == {"ids": ["a", "b"], "count": 2, "version": 1}
    again = client.post(f"/v1/banks/{bank_name}/store", json={"patterns": patterns, "ids": ["a", "b"]})
    assert again.json() == {"ids": ["a", "b"], "count": 2, "version": 1}  # a retry commits nothing new
    error(client.post(f"/v1/banks/{bank_name}/store", json={"patterns": [[0, 0, 1, 0]], "ids": ["a"]}), 409, "ids[0]")
    generated = client.post(f"/v1/banks/{bank_name}/store", json={"patterns": [[0, 0, 1, 0]]}).json()
    assert generated["count"] == 3 and len(generated["ids"][0]) == 32 and generated["version"] == 2
    info = client.get(f"/v1/banks/{bank_name}").json()
    assert info["count"] == 3 and info["bytes"] >= 3 * 4 * 4 and info["version"] == 2


def test_versions_advance_once_per_write_and_reads_wait_for_them(client, bank_name):
    create(client, bank_name, "modern", 4)
    stored = client.post(f"/v1/banks/{bank_name}/store", json={"patterns": [[1, 0, 0, 0], [0, 1, 0, 0]],
                                                               "ids": ["a", "b"]}).json()
    checksum = client.get(f"/v1/banks/{bank_name}").json()["checksum"]
    deleted = client.delete(f"/v1/banks/{bank_name}/patterns/a")
    assert deleted.status_code == 204 and deleted.headers["Amserve-Bank-Version"] == str(stored["version"] + 1)
    assert client.get(f"/v1/banks/{bank_name}").json()["checksum"] != checksum
    client.post(f"/v1/banks/{bank_name}/store", json={"patterns": [[1, 0, 0, 0]], "ids": ["a"]})
    info = client.get(f"/v1/banks/{bank_name}").json()
    assert info["version"] == stored["version"] + 2 and info["checksum"] == checksum  # same patterns again
    at = {"queries": [[1, 0, 0, 0]], "min_version": info["version"]}
    assert client.post(f"/v1/banks/{bank_name}/retrieve", json=at).status_code == 200
    ahead = client.post(f"/v1/banks/{bank_name}/retrieve", json={**at, "min_version": info["version"] + 5})
    assert "ahead" in error(ahead, 422, "min_version")["message"]  # no write has that version
    error(client.post(f"/v1/banks/{bank_name}/retrieve", json={**at, "min_version": -1}), 422, "min_version")


def test_retrieve_modern_matches_the_update_rule(client, bank_name):
    rng = np.random.default_rng(0)
    patterns = rng.standard_normal((20, 16)).astype(np.float32)
    beta = 2.0
    create(client, bank_name, "modern", 16, beta=beta)
    ids = [f"p{i}" for i in range(20)]
    client.post(f"/v1/banks/{bank_name}/store", json={"patterns": patterns.tolist(), "ids": ids})
    query = patterns[7] + 0.1 * rng.standard_normal(16).astype(np.float32)
    r = client.post(f"/v1/banks/{bank_name}/retrieve", json={"queries": [query.tolist()], "steps": 1, "trace": True})
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    scores = beta * patterns.astype(np.float64) @ query
    expected = patterns.T @ (np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum())
    np.testing.assert_allclose(result["state"], expected, rtol=1e-4, atol=1e-4)
    assert result["steps"] == 1
    assert len(result["trace"]) == 2 and result["trace"][1] <= result["trace"][0] + 1e-6
    assert result["nearest"]["id"] == "p7"
    cosine = expected @ patterns[7] / np.linalg.norm(expected) / np.linalg.norm(patterns[7])
    assert result["nearest"]["similarity"] == pytest.approx(cosine, abs=1e-4)


def test_complete_keeps_clamped_entries(client, bank_name):
    create(client, bank_name, "classical", 16)
    rng = np.random.default_rng(1)
    patterns = np.sign(rng.standard_normal((2, 16))).astype(np.float32)
    client.post(f"/v1/banks/{bank_name}/store", json={"patterns": patterns.tolist(), "ids": ["x", "y"]})
    mask = np.zeros(16, bool)
    mask[:12] = True
    cue = np.where(mask, patterns[0], 0.0)
    r = client.post(f"/v1/banks/{bank_name}/complete", json={"queries": [cue.tolist()], "mask": [mask.tolist()]})
    assert r.status_code == 200, r.text
    state = np.array(r.json()["results"][0]["state"])
    np.testing.assert_array_equal(state[mask], patterns[0][mask])
    assert set(np.unique(state)) <= {-1.0, 1.0}


def test_delete_pattern(client, bank_name):
    create(client, bank_name, "modern", 4, beta=8.0)
    client.post(f"/v1/banks/{bank_name}/store", json={"patterns": [[1, 0, 0, 0], [0, 1, 0, 0]], "ids": ["a", "b"]})
    assert client.delete(f"/v1/banks/{bank_name}/patterns/a").status_code == 204
    error(client.delete(f"/v1/banks/{bank_name}/patterns/a"), 404, "id")
    result = client.post(f"/v1/banks/{bank_name}/retrieve", json={"queries": [[0.9, 0.1, 0, 0]]}).json()["results"][0]
    assert result["nearest"]["id"] == "b"
    assert client.get(f"/v1/banks/{bank_name}").json()["count"] == 1


@pytest.mark.parametrize("body, field", [
    ({"kind": "nope", "dim": 4}, "kind"),
    ({"kind": "modern", "dim": 0}, "dim"),
    ({"kind": "modern", "dim": 4, "params": {"beta": -1}}, "params.beta"),
    ({"kind": "modern", "dim": 4, "params": {"unknown": 1}}, "params.unknown"),
    ({"kind": "drdam", "dim": 4, "params": {"feature_map": "bogus"}}, "params.feature_map"),
    ({"kind": "dense", "dim": 4, "params": {"n": 1}}, "params.n"),
    ({"dim": 4}, "kind"),
])
def test_create_bad_input_names_the_field(client, bank_name, body, field):
    error(client.put(f"/v1/banks/{bank_name}", json=body), 422, field)


def test_bad_bank_name(client):
    error(client.put("/v1/banks/Bad.Name", json={"kind": "modern", "dim": 4}), 422, "bank")


@pytest.mark.parametrize("body, field", [
    ({"queries": [[1, 2, 3]]}, "queries"),                         # wrong dimension
    ({"queries": []}, "queries"),                                   # empty
    ({"queries": [[1, 2, 3, 4], [1, 2]]}, "queries"),               # ragged
    ({"queries": [[1, 2, 3, "x"]]}, "queries[0][3]"),
    ({"queries": [[1, 2, 3, 4]], "steps": 0}, "steps"),
    ({"queries": [[1, 2, 3, 4]], "step_size": -1}, "step_size"),
    ({"queries": [[1, 2, 3, 4]], "extra": 1}, "extra"),
])
def test_retrieve_bad_input_names_the_field(client, bank_name, body, field):
    create(client, bank_name, "modern", 4)
    client.post(f"/v1/banks/{bank_name}/store", json={"patterns": [[1, 0, 0, 0]]})
    error(client.post(f"/v1/banks/{bank_name}/retrieve", json=body), 422, field)


def test_nan_and_infinity_are_refused(client, bank_name):
    create(client, bank_name, "modern", 2)
    for literal in ("NaN", "Infinity", "-Infinity"):
        r = client.post(f"/v1/banks/{bank_name}/store", content=f'{{"patterns": [[1.0, {literal}]]}}',
                        headers={"content-type": "application/json"})
        error(r, 422, "patterns[0][1]")
    assert client.get(f"/v1/banks/{bank_name}").json()["count"] == 0


def test_binary_kinds_refuse_non_binary_patterns(client, bank_name):
    create(client, bank_name, "classical", 3)
    error(client.post(f"/v1/banks/{bank_name}/store", json={"patterns": [[1, 0.5, -1]]}), 422, "patterns")


def test_complete_mask_shape(client, bank_name):
    create(client, bank_name, "modern", 3)
    client.post(f"/v1/banks/{bank_name}/store", json={"patterns": [[1, 0, 0]]})
    error(client.post(f"/v1/banks/{bank_name}/complete", json={"queries": [[1, 0, 0]], "mask": [[True, False]]}),
          422, "mask")
    error(client.post(f"/v1/banks/{bank_name}/complete", json={"queries": [[1, 0, 0]]}), 422, "mask")


def test_unknown_bank_and_empty_bank(client, bank_name):
    error(client.post("/v1/banks/missing-bank/retrieve", json={"queries": [[1.0]]}), 404, "bank")
    error(client.post("/v1/banks/missing-bank/store", json={"patterns": [[1.0]]}), 404, "bank")
    create(client, bank_name, "modern", 2)
    error(client.post(f"/v1/banks/{bank_name}/retrieve", json={"queries": [[1.0, 0.0]]}), 409)


def test_invalid_json_and_ids(client, bank_name):
    create(client, bank_name, "modern", 2)
    error(client.post(f"/v1/banks/{bank_name}/store", content=b"{not json", headers={"content-type": "application/json"}),
          400, "body")
    error(client.post(f"/v1/banks/{bank_name}/store", json={"patterns": [[1, 0], [0, 1]], "ids": ["a", "a"]}), 422, "ids")
    error(client.post(f"/v1/banks/{bank_name}/store", json={"patterns": [[1, 0]], "ids": ["a", "b"]}), 422, "ids")
    error(client.post(f"/v1/banks/{bank_name}/store", json={"patterns": [[1, 0]], "ids": ["bad id/"]}), 422, "ids[0]")


def test_probes_and_metrics(client, bank_name):
    assert client.get("/healthz/live").status_code == 200
    assert client.get("/healthz/ready").json()["ready"] is True
    create(client, bank_name, "modern", 2)
    client.post(f"/v1/banks/{bank_name}/store", json={"patterns": [[1, 0]]})
    client.get(f"/v1/banks/{bank_name}")
    client.post(f"/v1/banks/{bank_name}/retrieve", json={"queries": [[1, 0]]})
    text = client.get("/metrics").text
    for name in ("amserve_request_duration_seconds_bucket", "amserve_requests_in_flight",
                 "amserve_retrieve_steps_bucket", "amserve_requests_total"):
        assert name in text
    assert 'route="/v1/banks/{bank}/store"' in text
    assert bank_name not in text  # no label takes a bank name: unbounded, and /metrics is open by default


def test_openapi_documents_every_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/banks", "/v1/banks/{bank}", "/v1/banks/{bank}/store", "/v1/banks/{bank}/retrieve",
                 "/v1/banks/{bank}/complete", "/v1/banks/{bank}/patterns/{pattern_id}"):
        assert path in paths


def test_a_sharded_bank_answers_as_the_unsharded_bank_with_the_same_patterns(client, bank_name):
    rng = np.random.default_rng(11)
    patterns = rng.standard_normal((40, 6)).astype(np.float32)
    ids = [f"p{i}" for i in range(40)]
    for name, params in ((f"{bank_name}-whole", {"beta": 3.0}), (f"{bank_name}-split", {"beta": 3.0, "shards": 4})):
        create(client, name, "rbf", 6, **params)
        assert client.post(f"/v1/banks/{name}/store", json={"patterns": patterns.tolist(), "ids": ids}).status_code == 200
    info = client.get(f"/v1/banks/{bank_name}-split").json()
    assert info["params"] == {"beta": 3.0, "shards": 4} and info["count"] == 40
    assert [shard["shard"] for shard in info["shards"]] == [0, 1, 2, 3]
    assert sum(shard["count"] for shard in info["shards"]) == 40 and all(s["replicas"] for s in info["shards"])

    queries = (patterns[[2, 17]] + 0.5 * rng.standard_normal((2, 6))).tolist()
    whole, split = (client.post(f"/v1/banks/{bank_name}-{part}/retrieve", json={"queries": queries, "trace": True}
                                ).json()["results"] for part in ("whole", "split"))
    for expected, got in zip(whole, split):
        assert (got["nearest"]["id"], got["steps"]) == (expected["nearest"]["id"], expected["steps"])
        np.testing.assert_allclose(got["state"], expected["state"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["trace"], expected["trace"], rtol=1e-5, atol=1e-5)
    error(client.put(f"/v1/banks/{bank_name}-x", json={"kind": "classical", "dim": 4, "params": {"shards": 2}}),
          422, "params.shards")


MEMORY_BODIES = [  # what store, retrieve and complete might be sent: good, invalid, malformed
    ("store", b'{"patterns": [[1, 0, 0, 0], [0, 1, 0, 0]], "ids": ["a", "b"]}'),
    ("store", b'{"patterns": [[1, 0, 0]]}'),
    ("store", b'{"patterns": [[1.0, NaN, 0, 0]]}'),
    ("store", b'{"patterns": [[1, 0, 0, 0]], "ids": ["a", "a"]}'),
    ("retrieve", b'{"queries": [[0.9, 0.1, 0, 0]], "steps": 2, "trace": true}'),
    ("retrieve", b'{"queries": [[0.9, 0.1, 0, 0]], "encoding_format": "base64"}'),
    ("retrieve", b'{"queries": ["AACAPwAAAAAAAAAAAAAAAA=="], "encoding_format": "base64"}'),
    ("retrieve", b'{"queries": [[1, 2, 3, 4]], "steps": "3"}'),
    ("retrieve", b'{"queries": [[1, 2, 3, 4]], "extra": 1}'),
    ("retrieve", b'{"queries": [[1, 2, 3, 4]]'),
    ("retrieve", b''),
    ("retrieve", b'[]'),
    ("complete", b'{"queries": [[1, 0, 0, 0]], "mask": [[true, false, false, false]], "explain": true}'),
    ("complete", b'{"queries": [[1, 0, 0, 0]], "mask": [[true, false]]}'),
]


@pytest.mark.parametrize(("operation", "body"), MEMORY_BODIES)
def test_memory_routes_answer_as_fastapi_does(client, bank_name, operation, body):
    """The memory routes parse a JSON body themselves (service.api.middleware.FrontDoor); a `+json` media
    type goes through FastAPI's own handler instead: both answer the same, errors included."""
    create(client, bank_name, "modern", 4)
    client.post(f"/v1/banks/{bank_name}/store", json={"patterns": [[1, 0, 0, 0], [0, 0, 1, 0]], "ids": ["p", "q"]})
    answers = [client.post(f"/v1/banks/{bank_name}/{operation}", content=body, headers={"content-type": media_type})
               for media_type in ("application/json", "application/json; charset=utf-8", "application/vnd.amserve+json")]
    assert answers[0].status_code < 500
    for answer in answers[1:]:
        assert (answer.status_code, answer.json()) == (answers[0].status_code, answers[0].json())


def test_memory_routes_refuse_other_media_types_and_bad_names(client, bank_name):
    create(client, bank_name, "modern", 2)
    error(client.post(f"/v1/banks/{bank_name}/store", content=b'{"patterns": [[1, 0]]}',
                      headers={"content-type": "text/plain"}), 422, "body")
    error(client.post("/v1/banks/bad%20name/retrieve", json={"queries": [[1, 0]]}), 422, "bank")
    assert client.get(f"/v1/banks/{bank_name}").json()["count"] == 0
