"""The SDK's introspection calls over REST and gRPC, against what the raw HTTP API answers: explained
retrieve/complete, explained image completion, explain_text and a drdam bank's fidelity."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from amserve_client import (AsyncClient, Conflict, ExplainedStep, Fidelity, InvalidArgument,
                            TextExplanation, TopMemory)
from tests.api.test_explain_memory import stored
from tests.api.test_fidelity import drdam_bank
from tests.client.conftest import address

pytestmark = pytest.mark.parametrize("server", ["embedded"], indirect=True)  # the API suite's server

PROMPT = "The cat sat on the"


def assert_same_explanation(results, raw: dict) -> None:
    for result, expected in zip(results, raw["results"], strict=True):
        assert len(result.explanation) == len(expected["explanation"]) == result.steps + 1
        np.testing.assert_array_equal(result.trace, expected["trace"])
        for step, want in zip(result.explanation, expected["explanation"]):
            assert isinstance(step, ExplainedStep) and step.state.dtype == np.float32
            np.testing.assert_array_equal(step.state, np.asarray(want["state"], dtype=np.float32))
            assert step.energy == want["energy"]
            assert step.top_memories == [TopMemory(**m) for m in want["top_memories"]]
        np.testing.assert_array_equal(result.explanation[-1].state, result.state)


def test_explained_retrieve_and_complete_equal_the_http_api(sdk, client, bank_name):
    patterns = stored(client, bank_name, "rbf", beta=0.5)
    queries = patterns[:2].copy()
    queries[:, :4] *= -1
    raw = client.post(f"/v1/banks/{bank_name}/retrieve", json={"queries": queries.tolist(), "explain": True}).json()
    assert_same_explanation(sdk.retrieve(bank_name, queries, explain=True), raw)
    assert all(r.explanation is None for r in sdk.retrieve(bank_name, queries))

    mask = np.zeros((1, 16), bool)
    mask[:, :8] = True
    raw = client.post(f"/v1/banks/{bank_name}/complete", json={
        "queries": queries[:1].tolist(), "mask": mask.tolist(), "explain": True, "steps": 3}).json()
    assert_same_explanation(sdk.complete(bank_name, queries[:1], mask, explain=True, steps=3), raw)


def test_explained_image_completion_equals_the_http_api(sdk, client):
    image = np.random.default_rng(5).uniform(0, 1, (8, 8)).astype(np.float32)
    mask = np.zeros((8, 8), bool)
    mask[4:] = True
    raw = client.post("/v1/complete", json={"image": image.tolist(), "mask": mask.tolist(), "steps": 3,
                                            "explain": True}).json()
    done = sdk.complete_image(image, mask, steps=3, explain=True)
    assert len(done.frames) == len(raw["frames"]) == 4
    for frame, want in zip(done.frames, raw["frames"]):
        np.testing.assert_array_equal(frame.image, np.asarray(want["image"], dtype=np.float32))
        assert (frame.energy, frame.attention_energy, frame.hopfield_energy) == pytest.approx(
            (want["energy"], want["attention_energy"], want["hopfield_energy"]), rel=1e-6)
    np.testing.assert_array_equal(done.frames[-1].image, done.image)
    assert sdk.complete_image(image, mask, steps=3).frames is None


def test_explain_text_equals_the_http_api(sdk, client):
    options = {"temperature": 0.7, "top_k": 4, "top_p": 0.5, "top_n": 6, "layers": [5, 0], "heads": [2, 0]}
    raw = client.post("/v1/explain", json={"prompt": PROMPT, **options}).json()
    explained = sdk.explain_text(PROMPT, **options)
    assert isinstance(explained, TextExplanation) and explained.model == raw["model"]
    assert [(t.text, t.id) for t in explained.tokens] == [(t["text"], t["id"]) for t in raw["tokens"]]
    assert (explained.layers, explained.heads) == (raw["layers"], raw["heads"]) == ([0, 5], [0, 2])
    assert explained.attention.dtype == np.float32 and explained.attention.shape == (2, 2, 5, 5)
    np.testing.assert_allclose(explained.attention, raw["attention"], rtol=0, atol=1e-6)
    assert [(c.token, c.token_id, c.kept_by_top_k, c.kept_by_top_p) for c in explained.candidates] == [
        (c["token"], c["token_id"], c["kept_by_top_k"], c["kept_by_top_p"]) for c in raw["next_token"]["candidates"]]
    np.testing.assert_allclose([c.probability for c in explained.candidates],
                               [c["probability"] for c in raw["next_token"]["candidates"]], rtol=0, atol=1e-6)
    np.testing.assert_allclose(explained.distribution, raw["next_token"]["distribution"], rtol=0, atol=1e-6)
    whole = sdk.explain_text("Hello", top_n=2)  # every layer and head
    assert whole.attention.shape == (len(whole.layers), len(whole.heads), len(whole.tokens), len(whole.tokens))
    with pytest.raises(InvalidArgument) as unknown:
        sdk.explain_text(PROMPT, layers=[999])
    assert unknown.value.field == "layers"


def test_fidelity_equals_the_http_api(sdk, client, bank_name):
    drdam_bank(client, bank_name)
    raw = client.get(f"/v1/banks/{bank_name}/fidelity", params={"sample_size": 4, "noise": 0.3}).json()
    report = sdk.fidelity(bank_name, sample_size=4, noise=0.3)
    expected = Fidelity.from_fields(raw)
    assert (report.version, report.sample_size, report.noise) == (expected.version, 4, 0.3)
    for part in ("patterns", "noisy"):
        assert vars(getattr(report, part)) == pytest.approx(vars(getattr(expected, part)), rel=1e-6, abs=1e-9)
    assert report.same_nearest == pytest.approx(expected.same_nearest)
    assert sdk.fidelity(bank_name).sample_size == 8  # the default 64, capped at what is stored
    with pytest.raises(InvalidArgument) as bad:
        sdk.fidelity(bank_name, noise=5.0)
    assert bad.value.field == "noise"
    unkept = f"{bank_name[:50]}-u"
    drdam_bank(client, unkept, keep_patterns=False)
    with pytest.raises(Conflict) as conflict:
        sdk.fidelity(unkept)
    assert conflict.value.field == "bank" and "keep_patterns" in conflict.value.message


def test_async_introspection_answers_as_the_blocking_client(server, transport, sdk, client, bank_name):
    drdam_bank(client, bank_name)

    async def scenario():
        async with AsyncClient(address(server, transport), transport=transport) as amserve:
            return await asyncio.gather(amserve.explain_text(PROMPT, layers=[1], heads=[1], top_n=3),
                                        amserve.fidelity(bank_name, sample_size=3))

    explained, report = asyncio.run(scenario())
    blocking = sdk.explain_text(PROMPT, layers=[1], heads=[1], top_n=3)
    np.testing.assert_allclose(explained.attention, blocking.attention, rtol=0, atol=1e-6)
    assert [c.token_id for c in explained.candidates] == [c.token_id for c in blocking.candidates]
    assert report.sample_size == 3 and report.version == sdk.fidelity(bank_name, sample_size=3).version
    assert isinstance(report, Fidelity)
