"""The introspection API over gRPC, on every backend: Explain, explained Retrieve/Complete, explained
CompleteImage and BankFidelity answer what REST answers for the same input, and refuse what REST
refuses with the matching status code (413 RESOURCE_EXHAUSTED, 409 FAILED_PRECONDITION, 501
UNIMPLEMENTED, ...), naming the same field."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from sklearn.datasets import load_digits

from service.api import schemas
from service.api.grpc_server import create_server
from service.api.operations import Operations
from service.api.pb import amserve_pb2 as pb
from service.api.pb import amserve_pb2_grpc as pb_grpc
from service.errors import NotSupported
from tests.api.test_explain_memory import stored
from tests.api.test_fidelity import drdam_bank
from tests.api.test_grpc import vectors
from tests.api.test_rest import create

PROMPT = "The cat sat on the"
# REST status → the gRPC code the same refusal is answered with (service/api/errors.py)
GRPC_CODE = {404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.FAILED_PRECONDITION,
             413: grpc.StatusCode.RESOURCE_EXHAUSTED, 422: grpc.StatusCode.INVALID_ARGUMENT,
             501: grpc.StatusCode.UNIMPLEMENTED}


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def assert_refused_alike(call, rest_response) -> grpc.RpcError:
    """The gRPC call fails as the REST request did: the matching code, the same error code and field."""
    assert rest_response.status_code in GRPC_CODE, rest_response.text
    envelope = rest_response.json()["error"]
    error = refused(call)
    assert error.code() == GRPC_CODE[rest_response.status_code], error.details()
    trailers = dict(error.trailing_metadata())
    assert trailers["amserve-error-code"] == envelope["code"]
    assert trailers.get("amserve-error-field") == envelope.get("field")
    if envelope.get("field"):
        assert error.details().startswith(envelope["field"]), error.details()
    return error


# ----- Explain (the text model) ------------------------------------------------------------------

def explain_request(**fields) -> pb.ExplainRequest:
    return pb.ExplainRequest(**fields)


def assert_same_explanation(reply: pb.ExplainResponse, body: dict) -> None:
    assert reply.model == body["model"]
    assert [(t.text, t.id) for t in reply.tokens] == [(t["text"], t["id"]) for t in body["tokens"]]
    assert list(reply.layers) == body["layers"] and list(reply.heads) == body["heads"]
    expected = np.asarray(body["attention"], dtype=np.float64)
    assert list(reply.attention_shape) == list(expected.shape) == [
        len(body["layers"]), len(body["heads"]), len(body["tokens"]), len(body["tokens"])]
    np.testing.assert_allclose(np.reshape(reply.attention, reply.attention_shape), expected, rtol=0, atol=1e-6)
    candidates = [json_format.MessageToDict(c, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
                  for c in reply.next_token.candidates]
    assert len(candidates) == len(body["next_token"]["candidates"])
    for got, want in zip(candidates, body["next_token"]["candidates"]):
        assert (got["token"], int(got["token_id"]), got["kept_by_top_k"], got["kept_by_top_p"]) == (
            want["token"], want["token_id"], want["kept_by_top_k"], want["kept_by_top_p"])
        assert got["logit"] == pytest.approx(want["logit"], abs=1e-6)
        assert got["probability"] == pytest.approx(want["probability"], abs=1e-6)
    np.testing.assert_allclose(list(reply.next_token.distribution), body["next_token"]["distribution"],
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("fields", [
    {"prompt": PROMPT, "temperature": 0.7, "top_k": 4, "top_p": 0.5, "top_n": 12, "layers": [5, 0], "heads": [2, 0]},
    {"prompt": "Hello", "top_n": 3},  # every layer and head, the defaults
    {"prompt": PROMPT, "temperature": 0.0, "layers": [1], "heads": [3]},
])
def test_explain_answers_what_rest_answers(stub, client, fields):
    r = client.post("/v1/explain", json=fields)
    assert r.status_code == 200, r.text
    reply = stub.Explain(explain_request(**fields))
    assert_same_explanation(reply, r.json())
    # The flat attention is row-major [layer][head][query][key]: causal rows that each sum to 1.
    attention = np.reshape(reply.attention, reply.attention_shape)
    np.testing.assert_allclose(attention.sum(-1), 1, atol=1e-5)
    assert not np.triu(attention, 1).any()


@pytest.mark.parametrize("fields", [
    {"prompt": PROMPT, "layers": [0, 999]},
    {"prompt": PROMPT, "heads": [-1]},
    {"prompt": PROMPT, "heads": [99]},
    {"prompt": PROMPT, "top_n": 0},
    {"prompt": PROMPT, "top_p": 0.0},
    {"prompt": PROMPT, "temperature": -1.0},
    {"prompt": " the cat" * 200},  # every layer and head: over --max-attention-weights
])
def test_explain_refuses_what_rest_refuses(stub, client, fields):
    assert_refused_alike(lambda: stub.Explain(explain_request(**fields)), client.post("/v1/explain", json=fields))


def test_explain_unknown_layer_is_invalid_argument_naming_layers(stub):
    error = refused(lambda: stub.Explain(pb.ExplainRequest(prompt=PROMPT, layers=[0, 999])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(error.trailing_metadata())["amserve-error-field"] == "layers"
    assert error.details().startswith("layers") and "999" in error.details()


def test_a_backend_without_explain_answers_unimplemented():
    """REST's 501 (a backend that does not offer the operation) is UNIMPLEMENTED, with the envelope's code."""

    class NoExplain:
        async def explain_text(self, *args):
            raise NotSupported("explain runs on the embedded backend")

    async def call() -> grpc.aio.AioRpcError:
        server, _ = create_server(Operations(NoExplain()))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await pb_grpc.AmserveStub(channel).Explain(pb.ExplainRequest(prompt=PROMPT))
                return info.value
        finally:
            await server.stop(None)

    error = asyncio.run(call())
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert dict(error.trailing_metadata())["amserve-error-code"] == NotSupported.code
    assert "embedded backend" in error.details()


# ----- explained Retrieve and Complete ------------------------------------------------------------

def assert_same_results(results, body: dict) -> None:
    assert len(results) == len(body["results"])
    for got, want in zip(results, body["results"]):
        np.testing.assert_array_equal(np.float32(got.state), np.float32(want["state"]))
        assert (got.steps, got.converged) == (want["steps"], want["converged"])
        assert got.energy == pytest.approx(want["energy"], rel=1e-6)
        np.testing.assert_allclose(list(got.trace), want["trace"], rtol=1e-6)
        assert len(got.explanation) == len(want["explanation"]) == got.steps + 1
        for step, expected in zip(got.explanation, want["explanation"]):
            np.testing.assert_array_equal(np.float32(step.state), np.float32(expected["state"]))
            assert step.energy == pytest.approx(expected["energy"], rel=1e-6)
            assert [m.id for m in step.top_memories] == [m["id"] for m in expected["top_memories"]]
            np.testing.assert_allclose([m.weight for m in step.top_memories],
                                       [m["weight"] for m in expected["top_memories"]], rtol=1e-6, atol=1e-9)
        assert list(got.explanation[-1].state) == list(got.state)


def test_retrieve_explanation_equals_rest(stub, client, bank_name):
    patterns = stored(client, bank_name, "rbf", beta=0.5)
    queries = patterns[:2].copy()
    queries[:, :4] *= -1
    body = client.post(f"/v1/banks/{bank_name}/retrieve", json={"queries": queries.tolist(), "explain": True}).json()
    reply = stub.Retrieve(pb.RetrieveRequest(bank=bank_name, queries=vectors(queries), explain=True))
    assert_same_results(reply.results, body)
    assert reply.results[0].explanation[-1].top_memories[0].id == "m0"
    plain = stub.Retrieve(pb.RetrieveRequest(bank=bank_name, queries=vectors(queries)))
    assert not plain.results[0].explanation and not plain.results[0].trace


def test_complete_explanation_equals_rest(stub, client, bank_name):
    patterns = stored(client, bank_name, "classical", dim=16, count=2)
    mask = np.zeros_like(patterns[:1], dtype=bool)
    mask[:, :8] = True
    cue = np.where(mask, patterns[:1], 1.0)
    body = client.post(f"/v1/banks/{bank_name}/complete", json={
        "queries": cue.tolist(), "mask": mask.tolist(), "explain": True}).json()
    reply = stub.Complete(pb.CompleteRequest(bank=bank_name, queries=vectors(cue), explain=True,
                                             mask=[pb.Mask(values=row) for row in mask.tolist()]))
    assert_same_results(reply.results, body)
    assert {m.id for m in reply.results[0].explanation[0].top_memories} == {"m0", "m1"}


def test_explained_retrieve_refusals_match_rest(stub, client, bank_name):
    patterns = stored(client, bank_name, "modern")
    queries = np.repeat(patterns[:1], 101, axis=0)
    # 101 queries × (100 + 1) states: over the default --max-explain-states
    assert_refused_alike(
        lambda: stub.Retrieve(pb.RetrieveRequest(bank=bank_name, queries=vectors(queries), steps=100, explain=True)),
        client.post(f"/v1/banks/{bank_name}/retrieve", json={"queries": queries.tolist(), "steps": 100,
                                                              "explain": True}))
    sharded = f"{bank_name[:50]}-s"
    stored(client, sharded, "modern", shards=2)
    error = assert_refused_alike(
        lambda: stub.Retrieve(pb.RetrieveRequest(bank=sharded, queries=vectors([[1.0] * 16]), explain=True)),
        client.post(f"/v1/banks/{sharded}/retrieve", json={"queries": [[1.0] * 16], "explain": True}))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "shard" in error.details()


# ----- explained CompleteImage ------------------------------------------------------------------

def test_complete_image_frames_equal_rest(stub, client):
    image = (load_digits().images[-1] / 16.0).astype(np.float32)
    mask = np.zeros((8, 8), bool)
    mask[4:, :] = True  # bottom half missing
    body = client.post("/v1/complete", json={"image": image.tolist(), "mask": mask.tolist(), "steps": 5,
                                             "explain": True}).json()
    reply = stub.CompleteImage(pb.CompleteImageRequest(
        image=vectors(image), mask=[pb.Mask(values=row) for row in mask.tolist()], steps=5, explain=True))
    assert len(reply.frames) == len(body["frames"]) == 6
    for frame, expected in zip(reply.frames, body["frames"]):
        np.testing.assert_allclose([list(row.values) for row in frame.image], expected["image"], atol=1e-6)
        for part in ("energy", "attention_energy", "hopfield_energy"):
            assert getattr(frame, part) == pytest.approx(expected[part], rel=1e-6, abs=1e-6)
    np.testing.assert_array_equal([list(row.values) for row in reply.frames[-1].image],
                                  [list(row.values) for row in reply.image])
    np.testing.assert_allclose(list(reply.energy_trace), body["energy_trace"], rtol=1e-6)
    plain = stub.CompleteImage(pb.CompleteImageRequest(
        image=vectors(image), mask=[pb.Mask(values=row) for row in mask.tolist()], steps=5))
    assert not plain.frames
    np.testing.assert_allclose([list(row.values) for row in plain.image], [list(row.values) for row in reply.image],
                               atol=1e-6)


# ----- BankFidelity ----------------------------------------------------------------------------

def test_bank_fidelity_equals_rest(stub, client, bank_name):
    drdam_bank(client, bank_name)
    body = client.get(f"/v1/banks/{bank_name}/fidelity", params={"sample_size": 5, "noise": 0.2}).json()
    reply = stub.BankFidelity(pb.FidelityRequest(bank=bank_name, sample_size=5, noise=0.2))
    assert (reply.version, reply.sample_size, reply.noise) == (body["version"], body["sample_size"], body["noise"]) \
        == (1, 5, 0.2)
    for part in ("patterns", "noisy"):
        got = json_format.MessageToDict(getattr(reply, part), preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True)
        assert got == pytest.approx(body[part], rel=1e-6, abs=1e-9), part
    assert reply.same_nearest == pytest.approx(body["same_nearest"])
    # the defaults (sample_size 64, capped at what is stored; noise 0.1) as REST's
    defaults = client.get(f"/v1/banks/{bank_name}/fidelity").json()
    reply = stub.BankFidelity(pb.FidelityRequest(bank=bank_name))
    assert (reply.sample_size, reply.noise) == (defaults["sample_size"], defaults["noise"]) == (8, 0.1)
    assert reply.noisy.mean_abs_energy_error == pytest.approx(defaults["noisy"]["mean_abs_energy_error"], rel=1e-6)


def test_bank_fidelity_refuses_what_rest_refuses(stub, client, bank_name):
    unkept, other_kind = f"{bank_name[:50]}-u", f"{bank_name[:50]}-r"
    drdam_bank(client, unkept, keep_patterns=False)
    create(client, other_kind, "rbf", 16)
    drdam_bank(client, bank_name)
    cases = [(unkept, {}), (other_kind, {}), ("no-such-bank", {}), ("Bad Name", {}),
             (bank_name, {"sample_size": schemas.MAX_FIDELITY_SAMPLE + 1}), (bank_name, {"sample_size": 0}),
             (bank_name, {"noise": -1.0}), (bank_name, {"noise": 2.5})]
    codes = []
    for bank, options in cases:
        path = f"/v1/banks/{bank}/fidelity" if bank != "Bad Name" else "/v1/banks/Bad%20Name/fidelity"
        request = pb.FidelityRequest(bank=bank, **options)
        error = assert_refused_alike(lambda: stub.BankFidelity(request), client.get(path, params=options))
        codes.append(error.code())
    assert codes[:3] == [grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                         grpc.StatusCode.NOT_FOUND]
    assert stub.BankFidelity(pb.FidelityRequest(bank=bank_name, sample_size=schemas.MAX_FIDELITY_SAMPLE)).sample_size == 8


def test_the_introspection_rpcs_are_metered_like_their_routes(server, stub, client, bank_name):
    drdam_bank(client, bank_name)
    stub.BankFidelity(pb.FidelityRequest(bank=bank_name, sample_size=2))
    text = client.get("/metrics").text
    assert any(line.startswith("amserve_request_duration_seconds_count{") and 'route="BankFidelity"' in line
               and 'model="associative_memory"' in line and 'transport="grpc"' in line for line in text.splitlines())
