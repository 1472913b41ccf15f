"""Every operation of the SDK, over REST and gRPC, against what the raw HTTP API answers."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from amserve_client import Bank, Client, Conflict, InvalidArgument, NotFound, Shard, Stored, Usage
from tests.api.test_generate import running_sequences
from tests.client.conftest import address
from tests.helpers import wait_until

pytestmark = pytest.mark.parametrize("server", ["embedded"], indirect=True)  # the API suite's server

PROMPT = "The capital of France is"


@pytest.fixture()
def bank(client, bank_name):
    """A modern bank of 6 random 8-dim patterns stored through the raw API, and the patterns."""
    created = client.put(f"/v1/banks/{bank_name}", json={"kind": "modern", "dim": 8, "params": {"beta": 4.0}})
    assert created.status_code == 201, created.text
    patterns = np.random.default_rng(3).standard_normal((6, 8)).astype(np.float32)
    ids = [f"p{i}" for i in range(6)]
    r = client.post(f"/v1/banks/{bank_name}/store", json={"patterns": patterns.tolist(), "ids": ids})
    assert r.status_code == 200, r.text
    return bank_name, patterns


def assert_same_results(results, raw: dict) -> None:
    """SDK results equal the raw JSON answer: states to the float32 bit, every other field exactly."""
    assert len(results) == len(raw["results"])
    for result, expected in zip(results, raw["results"], strict=True):
        assert result.state.dtype == np.float32
        np.testing.assert_array_equal(result.state, np.asarray(expected["state"], dtype=np.float32))
        assert (result.energy, result.steps, result.converged) == (expected["energy"], expected["steps"],
                                                                   expected["converged"])
        assert (result.nearest.id, result.nearest.similarity) == (expected["nearest"]["id"],
                                                                  expected["nearest"]["similarity"])
        if expected.get("trace") is None:
            assert result.trace is None
        else:
            np.testing.assert_array_equal(result.trace, expected["trace"])


def test_bank_crud(sdk, client, bank_name):
    created = sdk.create_bank(bank_name, "modern", 4, {"beta": 8.0})
    assert created == Bank(name=bank_name, kind="modern", dim=4, params={"beta": 8.0}, count=0, bytes=0, version=0,
                           checksum="0" * 16, shards=[Shard(shard=0, count=0, replicas=["local"])])
    assert sdk.get_bank(bank_name) == Bank.from_fields(client.get(f"/v1/banks/{bank_name}").json()) == created
    listed = {b.name: b for b in sdk.list_banks()}
    assert listed[bank_name] == created
    assert sorted(listed) == sorted(b["name"] for b in client.get("/v1/banks").json()["banks"])
    with pytest.raises(Conflict) as exists:
        sdk.create_bank(bank_name, "modern", 4)
    assert (exists.value.code, exists.value.field) == ("already_exists", "bank")
    assert sdk.delete_bank(bank_name) is None
    assert client.get(f"/v1/banks/{bank_name}").status_code == 404
    with pytest.raises(NotFound):
        sdk.get_bank(bank_name)
    sharded = sdk.create_bank(bank_name, "rbf", 4, {"shards": 3})
    assert [(s.shard, s.count) for s in sharded.shards] == [(0, 0), (1, 0), (2, 0)]
    assert sdk.get_bank(bank_name) == Bank.from_fields(client.get(f"/v1/banks/{bank_name}").json()) == sharded
    sdk.delete_bank(bank_name)


def test_store_and_delete_pattern(sdk, client, bank_name):
    sdk.create_bank(bank_name, "modern", 4)
    patterns = np.eye(4, dtype=np.float32)[:2]
    assert sdk.store(bank_name, patterns, ids=["a", "b"]) == Stored(ids=["a", "b"], count=2, version=1)
    assert sdk.store(bank_name, patterns, ids=["a", "b"]).version == 1  # the same again commits nothing
    generated = sdk.store(bank_name, [0, 0, 1, 0])  # one vector is one row
    assert generated.count == 3 and generated.version == 2 and len(generated.ids[0]) == 32
    with pytest.raises(Conflict) as other_vector:
        sdk.store(bank_name, [0, 0, 0, 1], ids=["a"])
    assert other_vector.value.field == "ids[0]"
    assert sdk.delete_pattern(bank_name, "a") == 3
    info = client.get(f"/v1/banks/{bank_name}").json()
    assert (info["count"], info["version"]) == (2, 3)
    # the patterns stored are the float32 values given: the same bytes as storing them through the raw API
    twin = bank_name[:40] + "-raw"
    client.put(f"/v1/banks/{twin}", json={"kind": "modern", "dim": 4})
    client.post(f"/v1/banks/{twin}/store",
                json={"patterns": [[0, 1, 0, 0], [0, 0, 1, 0]], "ids": ["b", generated.ids[0]]})
    assert sdk.get_bank(bank_name).checksum == client.get(f"/v1/banks/{twin}").json()["checksum"]
    client.delete(f"/v1/banks/{twin}")


def test_retrieve_equals_the_http_api(sdk, client, bank):
    name, patterns = bank
    queries = (patterns[:3] + np.float32(0.4) * np.random.default_rng(4).standard_normal((3, 8))).astype(np.float32)
    raw = client.post(f"/v1/banks/{name}/retrieve",
                      json={"queries": queries.tolist(), "steps": 5, "trace": True}).json()
    assert_same_results(sdk.retrieve(name, queries, steps=5, trace=True), raw)
    raw = client.post(f"/v1/banks/{name}/retrieve", json={"queries": [queries[1].tolist()], "step_size": 0.5,
                                                          "tolerance": 1e-3, "min_version": 1}).json()
    assert_same_results(sdk.retrieve(name, queries[1], step_size=0.5, tolerance=1e-3, min_version=1), raw)
    with pytest.raises(InvalidArgument) as unreached:
        sdk.retrieve(name, queries, min_version=99)
    assert unreached.value.field == "min_version"


def test_complete_equals_the_http_api(sdk, client, bank):
    name, patterns = bank
    mask = np.zeros((2, 8), bool)
    mask[:, :3] = True
    queries = np.where(mask, patterns[[2, 4]], 0).astype(np.float32)
    raw = client.post(f"/v1/banks/{name}/complete", json={"queries": queries.tolist(), "mask": mask.tolist(),
                                                          "trace": True}).json()
    results = sdk.complete(name, queries, mask, trace=True)
    assert_same_results(results, raw)
    np.testing.assert_array_equal(results[0].state[:3], patterns[2, :3])  # clamped


def test_rest_sends_base64_by_default_and_floats_on_request(server, bank):
    name, patterns = bank
    bodies = []

    def record(request: httpx.Request) -> None:
        bodies.append(json.loads(request.content))
    answers = []
    for options in ({}, {"encoding_format": "float"}):  # the default, then floats
        with httpx.Client(event_hooks={"request": [record]}) as http, Client(server.url, http_client=http,
                                                                             **options) as sdk:
            answers.append(sdk.retrieve(name, patterns[:2], steps=3))
    packed, plain = bodies
    assert packed["encoding_format"] == "base64" and all(isinstance(q, str) for q in packed["queries"])
    assert "encoding_format" not in plain and plain["queries"] == patterns[:2].tolist()
    for a, b in zip(*answers, strict=True):
        np.testing.assert_array_equal(a.state, b.state)


def test_complete_image_equals_the_http_api(sdk, client):
    image = np.random.default_rng(5).uniform(0, 1, (8, 8)).astype(np.float32)
    mask = np.zeros((8, 8), bool)
    mask[4:] = True
    raw = client.post("/v1/complete", json={"image": image.tolist(), "mask": mask.tolist(), "steps": 3}).json()
    done = sdk.complete_image(image, mask, steps=3)
    assert done.model == raw["model"] == "energy-transformer"
    np.testing.assert_array_equal(done.image, np.asarray(raw["image"], dtype=np.float32))
    np.testing.assert_array_equal(done.energy_trace, raw["energy_trace"])
    assert done.image.shape == (8, 8) and len(done.energy_trace) == 4


def test_models_equal_the_http_api(sdk, client):
    raw = client.get("/v1/models").json()["data"]
    assert [(m.id, m.task, m.ready) for m in sdk.models()] == [(m["id"], m["task"], m["ready"]) for m in raw]
    assert any(m.task == "text-generation" for m in sdk.models())


def test_generate_equals_the_http_api(sdk, client):
    raw = client.post("/v1/generate", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 2}).json()
    generation = sdk.generate(PROMPT, max_tokens=6, temperature=0, logprobs=2)
    assert (generation.text, generation.tokens, generation.finish_reason) == (raw["text"], raw["tokens"],
                                                                             raw["finish_reason"])
    assert generation.usage == Usage(**raw["usage"])
    assert [(e.token, e.token_id, e.logprob, [(a.token, a.token_id, a.logprob) for a in e.top])
            for e in generation.logprobs] == [
        (e["token"], e["token_id"], e["logprob"], [(a["token"], a["token_id"], a["logprob"]) for a in e["top"]])
        for e in raw["logprobs"]]
    assert "Paris" in generation.text


def test_streaming_generate(sdk):
    whole = sdk.generate(PROMPT, max_tokens=8, temperature=0, stop=".")
    chunks = list(sdk.generate(PROMPT, stream=True, max_tokens=8, temperature=0, stop="."))
    *tokens, finish = chunks
    assert "".join(c.text for c in chunks) == whole.text
    assert [c.token_id for c in tokens] == whole.tokens and all(c.finish_reason is None for c in tokens)
    assert (finish.token_id, finish.finish_reason, finish.usage) == (None, whole.finish_reason, whole.usage)
    # a refused request raises at the call, before any chunk is asked for
    with pytest.raises(InvalidArgument) as refused:
        sdk.generate(PROMPT, stream=True, max_tokens=0)
    assert refused.value.field == "max_tokens"


def test_a_stream_closed_early_cancels_its_generation(sdk, server):
    assert wait_until(lambda: running_sequences(server) == 0, timeout=30)
    stream = sdk.generate(PROMPT, stream=True, max_tokens=1500, temperature=1.0, seed=1)
    assert next(stream).token_id is not None
    assert running_sequences(server) == 1
    stream.close()  # long before 1500 tokens
    assert wait_until(lambda: running_sequences(server) == 0, timeout=20)


def test_grpc_target_may_be_written_as_a_url(server):
    with Client(f"grpc://{address(server, 'grpc')}", transport="grpc") as sdk:
        assert isinstance(sdk.list_banks(), list)
