"""Explained retrieval: every step's state has the energy the trace recorded for it, and the top
memories' weights are what each kind's definition gives, computed here independently."""

from __future__ import annotations

import math

import pytest
import torch

from service.engines.memory import make_engine, normalize_params
from service.engines.memory.base import TOP_MEMORIES
from service.engines.memory.features import random_basis, random_features
from service.errors import InvalidArgument

DIM = 24
KINDS = [("classical", {}), ("dense", {"energy": "poly", "n": 3}), ("modern", {"beta": 2.0}), ("rbf", {"beta": 0.5}),
         ("drdam", {"beta": 0.5, "features": 2048, "seed": 3})]


def bank(kind: str, params: dict, count: int = 6):
    engine = make_engine(kind, DIM, normalize_params(kind, DIM, params))
    patterns = torch.sign(torch.randn(count, DIM, generator=torch.Generator().manual_seed(11)))
    engine.add(patterns)
    return engine, patterns


def corrupted(patterns: torch.Tensor, flips: int = 5) -> torch.Tensor:
    queries = patterns[:3].clone()
    queries[:, :flips] *= -1
    return queries


@pytest.mark.parametrize("kind,params", KINDS)
def test_each_step_state_has_the_traced_energy(kind, params):
    engine, patterns = bank(kind, params)
    out = engine.run(corrupted(patterns), steps=6, explain=True)
    explained = out.explanation
    assert explained.states.shape[:2] == out.trace.shape
    for row, steps in enumerate(out.steps.tolist()):
        states = explained.states[row, :steps + 1]
        # The engine's own energy of each recorded state (a fresh evaluation) is the trace's entry.
        torch.testing.assert_close(engine.energy(states), out.trace[row, :steps + 1], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(states[0], corrupted(patterns)[row] if not engine.binary
                                   else torch.sign(corrupted(patterns)[row]))
        torch.testing.assert_close(states[-1], out.states[row])
        assert torch.isnan(explained.states[row, steps + 1:]).all()
        assert (explained.top_rows[row, steps + 1:] == -1).all()
    assert explained.top_rows.shape[-1] == min(TOP_MEMORIES, len(patterns))


def independent_weights(kind: str, params: dict, states: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    s, p = states.double(), patterns.double()
    if kind in ("classical", "dense"):
        return s @ p.T / DIM
    if kind == "modern":
        return torch.softmax(params["beta"] * s @ p.T, dim=-1)
    if kind == "rbf":
        return torch.softmax(-params["beta"] / 2 * torch.cdist(s, p).square(), dim=-1)
    projection, offset = random_basis(params["features"], DIM, params["beta"], params["seed"], "cpu")
    phi_states, phi_patterns = (random_features(x, projection, offset, params["beta"], "sincos").double()
                                for x in (states, patterns))
    # φ(v)·φ(ξ_μ) over ⟨φ(v), T⟩ with T = Σ_μ φ(ξ_μ), as DrDAM stores it.
    return phi_states @ phi_patterns.T / (phi_states @ phi_patterns.sum(dim=0))[:, None]


@pytest.mark.parametrize("kind,params", KINDS)
def test_top_memories_are_the_strongest_by_the_kinds_weight(kind, params):
    engine, patterns = bank(kind, params)
    out = engine.run(corrupted(patterns), steps=6, explain=True)
    first = out.explanation.states[:, 0]
    expected = independent_weights(kind, params, first, patterns)
    top = out.explanation.top_rows[:, 0]
    torch.testing.assert_close(out.explanation.top_weights[:, 0].double(), expected.gather(1, top),
                               rtol=1e-4, atol=1e-5)
    # Listed strongest first, and nothing stronger left out.
    weights = out.explanation.top_weights[:, 0]
    assert (weights[:, :-1] >= weights[:, 1:]).all()
    assert (expected.max(dim=-1).values.float() <= weights[:, 0] + 1e-5).all()
    if kind in ("modern", "rbf", "drdam"):  # shares of one whole
        torch.testing.assert_close(expected.sum(dim=-1), torch.ones(3, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_the_corrupted_patterns_own_memory_pulls_it_hardest_once_retrieved():
    engine, patterns = bank("modern", {"beta": 2.0})
    out = engine.run(corrupted(patterns), explain=True)
    for row, steps in enumerate(out.steps.tolist()):
        assert out.explanation.top_rows[row, steps, 0] == row
        assert out.explanation.top_weights[row, steps, 0] > 0.99


def test_drdam_without_patterns_lists_no_top_memories():
    engine, patterns = bank("drdam", {"beta": 0.5, "features": 512, "seed": 1, "keep_patterns": False})
    out = engine.run(corrupted(patterns), steps=3, explain=True)
    assert out.explanation.top_rows.shape[-1] == 0 and out.explanation.states.shape[1] == out.trace.shape[1]


def test_a_sharded_bank_refuses_to_explain():
    engine, patterns = bank("modern", {"beta": 2.0, "shards": 2})
    with pytest.raises(InvalidArgument) as refused:
        engine.run(corrupted(patterns), explain=True)
    assert refused.value.field == "explain" and "shard" in str(refused.value)


def test_explain_implies_the_trace_and_leaves_the_answer_unchanged():
    engine, patterns = bank("rbf", {"beta": 0.5})
    plain = engine.run(corrupted(patterns), trace=True)
    explained = engine.run(corrupted(patterns), explain=True)
    assert torch.equal(plain.states, explained.states) and torch.equal(plain.steps, explained.steps)
    torch.testing.assert_close(plain.trace, explained.trace, equal_nan=True)
    assert not math.isnan(explained.trace[0, 0])
