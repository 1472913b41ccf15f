"""Sampling: validation, exact filtered distributions, seeds, logprobs and stop strings."""

from __future__ import annotations

import math

import pytest
import torch

from service.engines.lm.sampling import SamplingParams, StopMatcher, make_generator, sample
from service.errors import InvalidArgument

PROBS = [0.5, 0.2, 0.15, 0.1, 0.05]
LOGITS = torch.tensor([math.log(p) for p in PROBS])


def expected_distribution(temperature: float, top_k: int, top_p: float) -> list[float]:
    """Computed by hand: p^(1/T) renormalised, then the top-k / top-p prefix of it, renormalised."""
    scaled = [p ** (1 / temperature) for p in PROBS]
    scaled = [s / sum(scaled) for s in scaled]  # PROBS is sorted, so the order is kept
    kept, mass = [], 0.0
    for rank, s in enumerate(scaled):
        if (top_k and rank >= top_k) or mass >= top_p:
            break
        kept.append(s)
        mass += s
    return [k / sum(kept) for k in kept] + [0.0] * (len(PROBS) - len(kept))


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"logprobs": 21}, "logprobs"),
    ({"stop": [""]}, "stop"),
    ({"seed": -1}, "seed"),
])
def test_invalid_parameters_name_their_field(kwargs, field):
    with pytest.raises(InvalidArgument) as error:
        SamplingParams(**kwargs)
    assert error.value.field == field


def test_greedy_rows_take_the_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0)] * 6
    out = sample(logits, params, [make_generator(i) for i in range(6)])
    assert out.tokens.tolist() == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (2.0, 0, 1.0), (0.5, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.6), (1.0, 0, 0.75), (2.0, 2, 0.9),
])
def test_reported_distribution_is_the_filtered_one(temperature, top_k, top_p):
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, logprobs=5)
    out = sample(LOGITS[None], [params], [make_generator(0)])
    expected = expected_distribution(temperature, top_k, top_p)
    reported = dict(out.logprobs[0].top)
    assert list(reported) == [i for i, p in enumerate(expected) if p > 0]  # most likely first, zeros left out
    for token, logprob in reported.items():
        assert math.exp(logprob) == pytest.approx(expected[token], abs=1e-6)
    chosen = out.tokens.item()
    assert math.exp(out.logprobs[0].logprob) == pytest.approx(expected[chosen], abs=1e-6)


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (1.0, 0, 0.6), (2.0, 3, 1.0)])
def test_sample_frequencies_follow_the_distribution(temperature, top_k, top_p):
    rows = 4000
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)] * rows
    out = sample(LOGITS.expand(rows, -1), params, [make_generator(i) for i in range(rows)])
    counts = torch.bincount(out.tokens, minlength=len(PROBS)).tolist()
    for count, p in zip(counts, expected_distribution(temperature, top_k, top_p)):
        sigma = math.sqrt(rows * p * (1 - p))
        assert abs(count - rows * p) <= 5 * sigma + 1e-9  # never outside the support when p == 0


def sampled_stream(params: SamplingParams, steps: int, batch_mates: int = 0) -> list[int]:
    """Draw `steps` tokens for one request, optionally sharing each call with other requests."""
    logits = torch.randn(steps, 1 + batch_mates, 40, generator=torch.Generator().manual_seed(5))
    generators = [make_generator(params.seed)] + [make_generator(100 + i) for i in range(batch_mates)]
    others = [SamplingParams(temperature=0.7, top_k=5, logprobs=2)] * batch_mates
    out = []
    for step in range(steps):
        logits[step, 0] = logits[0, 0]  # the same distribution at every step for our request
        out.append(sample(logits[step], [params, *others], generators).tokens[0].item())
    return out


def test_same_seed_same_tokens_whatever_the_batch():
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    alone = sampled_stream(params, 40)
    assert alone == sampled_stream(params, 40)
    assert alone == sampled_stream(params, 40, batch_mates=3)
    assert len(set(alone)) > 3  # genuinely random draws
    assert alone != sampled_stream(SamplingParams(temperature=1.0, top_p=0.95, seed=4321), 40)


def test_logprobs_are_sorted_and_sum_to_at_most_one():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(2)) * 3
    params = [SamplingParams(temperature=t, top_k=k, logprobs=n) for t, k, n in
              [(0.0, 0, 5), (1.0, 0, 20), (0.8, 4, 10), (1.0, 0, 0)]]
    out = sample(logits, params, [make_generator(i) for i in range(4)])
    for row, (p, lp) in enumerate(zip(params, out.logprobs)):
        if not p.logprobs:
            assert lp is None
            continue
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True) and 0 < len(values) <= p.logprobs
        assert sum(math.exp(v) for v in values) <= 1 + 1e-6
        assert lp.token_id == out.tokens[row].item()
    greedy = out.logprobs[0]
    assert greedy.top[0][0] == greedy.token_id == logits[0].argmax().item()
    assert greedy.logprob == pytest.approx(torch.log_softmax(logits[0], -1).max().item(), abs=1e-5)
    assert len(out.logprobs[2].top) == 4  # top_k=4 leaves four candidates


def test_stop_string_split_across_pushes_is_held_back_and_dropped():
    matcher = StopMatcher(["STOP"])
    assert matcher.push("abc S") == ("abc ", False)
    assert matcher.push("TO") == ("", False)
    assert matcher.push("P and more") == ("", True)


def test_false_alarm_is_released():
    matcher = StopMatcher(["STOP"])
    assert matcher.push("a ST") == ("a ", False)
    assert matcher.push("ART") == ("START", False)
    assert matcher.push("xx S") == ("xx ", False)
    assert matcher.flush() == "S"


def test_earliest_stop_string_wins():
    matcher = StopMatcher(["world", "lo"])
    assert matcher.push("hello world") == ("hel", True)
    assert StopMatcher([]).push("anything") == ("anything", False)
