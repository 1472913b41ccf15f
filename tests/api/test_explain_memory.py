"""Explained retrieve/complete over a real socket, on every backend: per-step states, energies equal to
the trace, top memories by id; the size limit and the sharded refusal name their field."""

from __future__ import annotations

import base64

import numpy as np

from tests.api.test_rest import create, error


def stored(client, bank, kind="modern", dim=16, count=4, **params) -> np.ndarray:
    create(client, bank, kind, dim, **params)
    patterns = np.sign(np.random.default_rng(5).standard_normal((count, dim)))
    r = client.post(f"/v1/banks/{bank}/store", json={"patterns": patterns.tolist(),
                                                     "ids": [f"m{i}" for i in range(count)]})
    assert r.status_code == 200, r.text
    return patterns


def test_retrieve_explains_every_step(client, bank_name):
    patterns = stored(client, bank_name, "rbf", beta=0.5)
    queries = patterns[:2].copy()
    queries[:, :4] *= -1
    r = client.post(f"/v1/banks/{bank_name}/retrieve", json={"queries": queries.tolist(), "explain": True})
    assert r.status_code == 200, r.text
    for row, result in enumerate(r.json()["results"]):
        steps = result["explanation"]
        assert len(steps) == result["steps"] + 1 == len(result["trace"])
        assert [step["energy"] for step in steps] == result["trace"]
        np.testing.assert_allclose(steps[0]["state"], queries[row], rtol=0, atol=1e-6)
        assert steps[-1]["state"] == result["state"]
        top = steps[-1]["top_memories"]
        assert top[0]["id"] == result["nearest"]["id"] == f"m{row}" and top[0]["weight"] > 0.9
        assert [m["weight"] for m in top] == sorted((m["weight"] for m in top), reverse=True)


def test_complete_explains_and_keeps_the_clamped_entries(client, bank_name):
    patterns = stored(client, bank_name, "classical", dim=16, count=2)
    mask = np.zeros_like(patterns[:1], dtype=bool)
    mask[:, :8] = True
    cue = np.where(mask, patterns[:1], 1.0)
    r = client.post(f"/v1/banks/{bank_name}/complete", json={"queries": cue.tolist(), "mask": mask.tolist(),
                                                              "explain": True})
    assert r.status_code == 200, r.text
    steps = r.json()["results"][0]["explanation"]
    for step in steps:
        assert step["state"][:8] == patterns[0, :8].tolist()
        assert {m["id"] for m in step["top_memories"]} == {"m0", "m1"}
        assert all(-1 <= m["weight"] <= 1 for m in step["top_memories"])  # overlaps ξ·v/D


def test_explained_states_follow_the_encoding_format(client, bank_name):
    patterns = stored(client, bank_name, "modern", beta=4.0)
    r = client.post(f"/v1/banks/{bank_name}/retrieve", json={"encoding_format": "base64", "explain": True,
                                                              "queries": [base64.b64encode(patterns[0].astype("<f4")).decode()]})
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    last = result["explanation"][-1]["state"]
    assert last == result["state"]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(last), "<f4"), patterns[0])


def test_too_many_explained_states_is_413_naming_explain(client, bank_name):
    patterns = stored(client, bank_name, "modern")
    queries = np.repeat(patterns[:1], 101, axis=0).tolist()
    # 101 queries × (100 + 1) states is over the default limit of 10000; without explain it is served.
    error(client.post(f"/v1/banks/{bank_name}/retrieve", json={"queries": queries, "steps": 100, "explain": True}),
          413, "explain")
    assert client.post(f"/v1/banks/{bank_name}/retrieve", json={"queries": queries, "steps": 100}).status_code == 200
    # The kind's default step count (modern: 20) counts when the request gives none: 101 × 21 fits.
    assert client.post(f"/v1/banks/{bank_name}/retrieve", json={"queries": queries, "explain": True}).status_code == 200


def test_a_sharded_bank_refuses_explain_with_422(client, bank_name):
    stored(client, bank_name, "modern", shards=2)
    body = error(client.post(f"/v1/banks/{bank_name}/retrieve", json={"queries": [[1.0] * 16], "explain": True}),
                 422, "explain")
    assert "shard" in body["message"]


def test_explain_must_be_a_boolean(client, bank_name):
    stored(client, bank_name)
    error(client.post(f"/v1/banks/{bank_name}/retrieve", json={"queries": [[1.0] * 16], "explain": "yes"}),
          422, "explain")
