"""POST /v1/explain: the served text model's own attention and next-token distribution, its limits,
and its place in the OpenAPI document; embedded and through Triton's llm model alike."""

from __future__ import annotations

import httpx
import pytest
import torch

from service.backends.embedded import resolve_model
from service.engines.lm.sampling import SamplingParams, sampling_distribution
from service.config import Settings
from service.engines.lm.weights import load_model
from tests.harness import ROOT, ServerProcess

PROMPT = "The cat sat on the"


@pytest.fixture(scope="module", params=["embedded", "triton"])
def text_server(request, tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("explain"), backend=request.param) as proc:
        yield proc


@pytest.fixture(scope="module")
def api(text_server):
    with httpx.Client(base_url=text_server.url, timeout=120.0) as client:
        yield client


@pytest.fixture(scope="module")
def served_model():
    path, _ = resolve_model("default", ROOT / "model_repository")
    return load_model(path, dtype=Settings().dtype)  # the weights as the server loads them


def test_attention_is_the_models_own_causal_softmax(api, served_model):
    model, tokenizer = served_model
    r = api.post("/v1/explain", json={"prompt": PROMPT, "layers": [0, 5], "heads": [2, 0]})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = [t["id"] for t in body["tokens"]]
    assert ids == tokenizer.encode(PROMPT) and [t["text"] for t in body["tokens"]][1] == " cat"
    assert body["layers"] == [0, 5] and body["heads"] == [0, 2]
    attention = torch.tensor(body["attention"])
    assert attention.shape == (2, 2, len(ids), len(ids))
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 2, len(ids)))
    assert torch.equal(attention.triu(1), torch.zeros_like(attention))
    expected: list[torch.Tensor] = []
    model(torch.tensor([ids]), expected)
    torch.testing.assert_close(attention, torch.stack([expected[0][0, [0, 2]], expected[5][0, [0, 2]]]),
                               atol=1e-5, rtol=0)


def test_candidates_are_softmax_over_temperature_and_kept_as_the_sampler_keeps(api, served_model):
    model, tokenizer = served_model
    request = {"prompt": PROMPT, "temperature": 0.7, "top_k": 4, "top_p": 0.5, "top_n": 12, "layers": [0]}
    body = api.post("/v1/explain", json=request).json()
    candidates = body["next_token"]["candidates"]
    # the pass that also keeps the attention weights, as the explanation's (in int4 the bf16 rounding
    # of activations turns the two attention kernels' last-bit differences into visible ones)
    logits = model(torch.tensor([tokenizer.encode(PROMPT)]), [])[0, -1]
    probabilities = torch.softmax(logits / 0.7, dim=-1)
    assert len(candidates) == 12
    ids = [c["token_id"] for c in candidates]
    torch.testing.assert_close(torch.tensor([c["probability"] for c in candidates]), probabilities[ids],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor([c["logit"] for c in candidates]), logits[ids], atol=1e-4, rtol=0)
    _, _, kept = sampling_distribution(logits, SamplingParams(temperature=0.7, top_k=4, top_p=0.5))
    torch.testing.assert_close(torch.tensor(body["next_token"]["distribution"]), kept[:12], atol=1e-4, rtol=0)
    assert [c["kept_by_top_k"] for c in candidates] == [i < 4 for i in range(12)]
    mass_before = probabilities[ids].cumsum(0) - probabilities[ids]
    assert [c["kept_by_top_p"] for c in candidates] == [i == 0 or m < 0.5 for i, m in enumerate(mass_before.tolist())]
    # the drawn distribution is what both filters keep, renormalised
    assert all((d > 0) == (c["kept_by_top_k"] and c["kept_by_top_p"])
               for d, c in zip(body["next_token"]["distribution"], candidates))


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"prompt": PROMPT, "layers": [0, 999]}, 422, "layers"),
    ({"prompt": PROMPT, "heads": [-1]}, 422, "heads[0]"),
    ({"prompt": PROMPT, "heads": [99]}, 422, "heads"),
    ({"prompt": PROMPT, "top_n": 0}, 422, "top_n"),
    ({"prompt": " the cat" * 200}, 413, "prompt"),  # every layer and head: 270 × 401² weights
])
def test_refusals_name_the_field(api, body, status, field):
    r = api.post("/v1/explain", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field


def test_a_long_prompt_passes_with_one_layer_and_head(api):
    r = api.post("/v1/explain", json={"prompt": " the cat" * 200, "layers": [3], "heads": [1], "top_n": 1})
    assert r.status_code == 200, r.text
    assert len(r.json()["attention"][0][0]) == len(r.json()["tokens"])


def test_in_the_openapi_document(api):
    operation = api.get("/openapi.json").json()["paths"]["/v1/explain"]["post"]
    assert {"200", "413", "422"} <= set(operation["responses"])

