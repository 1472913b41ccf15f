"""Storage capacity: a dense associative memory (n = 3) holds far more patterns than Hopfield's.

Capacity here is the largest number K of random ±1 patterns (D = 100) for which at least 95%
of them are recovered exactly from cues with 10% of their bits flipped. Theory: about 0.14·D
for the classical network, of order D²/ln D for the cubic dense memory.
"""

from __future__ import annotations

import torch

from service.engines.memory import make_engine, normalize_params

DIM = 100
FLIPPED_BITS = 10
TARGET_RECALL = 0.95


def recall(kind: str, params: dict, count: int, seed: int = 0) -> float:
    """Fraction of `count` stored patterns recovered exactly from their noisy cues."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randint(0, 2, (count, DIM), generator=generator).float() * 2 - 1
    flips = torch.rand(count, DIM, generator=generator).argsort(dim=-1)[:, :FLIPPED_BITS]
    cues = patterns.clone()
    cues.scatter_(1, flips, -cues.gather(1, flips))
    engine = make_engine(kind, DIM, normalize_params(kind, DIM, params))
    engine.add(patterns)
    result = engine.run(cues)
    return (result.states == patterns).all(dim=-1).float().mean().item()


def capacity(kind: str, params: dict, counts: list[int]) -> int:
    """Largest count in `counts` that reaches the target recall (0 if none does)."""
    return max((count for count in counts if recall(kind, params, count) >= TARGET_RECALL), default=0)


def test_dense_cubic_memory_stores_more_than_twice_the_classical_capacity() -> None:
    classical = capacity("classical", {}, list(range(2, 41, 2)))
    # The measured classical capacity sits near (below) the 0.14·D theory.
    assert 0.05 * DIM <= classical <= 0.2 * DIM, classical

    dense = capacity("dense", {"energy": "poly", "n": 3}, [classical * factor for factor in (1, 2, 4, 8)])
    assert dense >= 2 * classical, (dense, classical)
    # Beyond capacity recall collapses: at 4× its capacity the classical network fails.
    assert recall("classical", {}, 4 * classical) < 0.5


def test_dense_exponential_memory_recovers_far_beyond_classical_capacity() -> None:
    # 200 patterns is 2·D, about fourteen times the classical 0.14·D.
    assert recall("dense", {"energy": "exp", "beta": 1.0}, 2 * DIM) >= TARGET_RECALL
