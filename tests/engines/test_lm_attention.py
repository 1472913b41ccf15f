"""The served model's attention weights (the same blocks as every forward) against HF transformers'
output_attentions, and the next-token distribution against the sampler's own filters."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from service.engines.lm.sampling import SamplingParams, sampling_distribution
from tests.engines.test_lm_model import VOCAB, pair  # noqa: F401  (the HF/ours model pair fixture)


def test_attention_weights_match_hf_output_attentions(pair):  # noqa: F811
    hf, ours, _ = pair
    tokens = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(4))
    hf.config._attn_implementation = "eager"  # HF computes the weights only with its eager attention
    with torch.no_grad():
        expected = hf(tokens, output_attentions=True)
    attention: list[torch.Tensor] = []
    logits = ours(tokens, attention)
    assert len(attention) == len(expected.attentions)
    for layer, weights in zip(attention, expected.attentions):
        torch.testing.assert_close(layer, weights, atol=1e-5, rtol=0)
        assert torch.equal(layer.triu(1), torch.zeros_like(layer))  # causal
    # The weighted path leaves the logits as the fused kernel gives them.
    torch.testing.assert_close(logits, ours(tokens), atol=1e-5, rtol=0)


def test_distribution_is_softmax_over_temperature_and_keeps_what_top_k_top_p_keep():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    order, probs, kept = sampling_distribution(logits, SamplingParams(temperature=0.5, top_k=3, top_p=0.9))
    expected = torch.softmax(logits / 0.5, dim=-1)
    torch.testing.assert_close(probs, expected[order])
    assert order.tolist() == [0, 1, 2, 3, 4]
    # top-p 0.9 keeps the prefix whose mass before each token is < 0.9: tokens 0 and 1 (0.867 before 2).
    mass_before = expected.cumsum(0) - expected
    survivors = (mass_before < 0.9) & (torch.arange(5) < 3)
    torch.testing.assert_close(kept, torch.where(survivors, expected, 0) / expected[survivors].sum())
    _, _, greedy = sampling_distribution(logits, SamplingParams(temperature=0.0))
    assert greedy.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
