"""Adding and removing patterns, growth of the storage, nearest-memory reports."""

from __future__ import annotations

import math

import pytest
import torch

from service.engines.memory import make_engine, normalize_params
from tests.engines.memory_cases import CASES, build

DIM = 16

def patterns_for(kind: str, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if kind in ("classical", "dense"):
        return torch.randint(0, 2, (count, DIM), generator=generator).float() * 2 - 1
    return torch.randn(count, DIM, generator=generator) / math.sqrt(DIM)


@pytest.mark.parametrize("case", CASES)
def test_after_removals_the_engine_equals_one_built_from_the_rest(case: str) -> None:
    kind = CASES[case][0]
    patterns = patterns_for(kind, 10, seed=1)
    engine = build(case, patterns[:6])
    engine.add(patterns[6:])
    order = list(range(10))  # the caller's id list, mirroring swap-removal
    for row in (3, 8, 0, 5):
        engine.remove(row, patterns[order[row]])
        order[row] = order[-1]
        order.pop()

    rebuilt = build(case, patterns[order])
    assert engine.count == rebuilt.count == 6
    if engine.keeps_patterns:
        assert torch.equal(engine.patterns, patterns[order])
    if kind == "classical":
        assert torch.equal(engine.weights, rebuilt.weights)
    if kind == "drdam":
        torch.testing.assert_close(engine.memory, rebuilt.memory, atol=1e-5, rtol=1e-5)
    probes = patterns_for(kind, 5, seed=2)
    torch.testing.assert_close(engine.energy(probes), rebuilt.energy(probes), atol=1e-5, rtol=1e-5)
    # DrDAM's T after subtractions differs from a fresh sum by rounding, which the dynamics carry along.
    torch.testing.assert_close(engine.run(probes).states, rebuilt.run(probes).states, atol=2e-4, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_nearest_memory_is_the_most_cosine_similar_pattern(case: str) -> None:
    kind = CASES[case][0]
    patterns = patterns_for(kind, 30, seed=3)
    engine = build(case, patterns)
    result = engine.run(patterns_for(kind, 7, seed=4), steps=3)

    cosine = torch.nn.functional.cosine_similarity(result.states[:, None, :].double(), patterns[None].double(), dim=-1)
    best, index = cosine.max(dim=-1)
    torch.testing.assert_close(result.similarity.double(), best, atol=1e-5, rtol=0)
    chosen = cosine.gather(1, result.nearest[:, None])[:, 0]
    torch.testing.assert_close(chosen, best, atol=1e-5, rtol=0)  # ties may pick either index
    assert result.nearest.dtype == torch.int64 and result.similarity.dtype == torch.float32


def test_storage_grows_by_doubling_and_keeps_every_row() -> None:
    engine = make_engine("modern", DIM, normalize_params("modern", DIM, {}))
    patterns = patterns_for("modern", 100, seed=5)
    capacities = []
    for row in patterns:
        engine.add(row[None])
        # Serving state: a capacity×D float32 buffer plus one float32 norm per row.
        capacities.append(engine.nbytes() / (4 * (DIM + 1)))
    assert torch.equal(engine.patterns, patterns)
    assert sorted(set(capacities)) == [16, 32, 64, 128]


def test_removing_the_last_row_and_out_of_range_rows() -> None:
    patterns = patterns_for("rbf", 3, seed=6)
    engine = build("rbf", patterns)
    engine.remove(2, patterns[2])
    assert torch.equal(engine.patterns, patterns[:2])
    with pytest.raises(IndexError):
        engine.remove(2, patterns[2])


def test_classical_weights_are_the_hebbian_sum_with_zero_diagonal() -> None:
    patterns = patterns_for("classical", 5, seed=7)
    engine = build("classical", patterns)
    expected = torch.einsum("ki,kj->ij", patterns, patterns) - 5 * torch.eye(DIM)
    assert torch.equal(engine.weights, expected)
