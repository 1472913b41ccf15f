"""DrDAM: random features approximate the exact RBF memory, with error ~ 1/√Y."""

from __future__ import annotations

import math

import pytest
import torch

from service.engines.memory import features as feature_module
from service.engines.memory import make_engine, normalize_params
from service.engines.memory.features import FEATURE_MAPS, feature_sum, random_basis, random_features


def unit_patterns(count: int, dim: int, seed: int) -> torch.Tensor:
    patterns = torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))
    return patterns / patterns.norm(dim=-1, keepdim=True)


def drdam(dim: int, patterns: torch.Tensor | None = None, **params):
    engine = make_engine("drdam", dim, normalize_params("drdam", dim, params))
    if patterns is not None:
        engine.add(patterns)
    return engine


def test_energy_error_against_rbf_shrinks_like_inverse_sqrt_features() -> None:
    dim, count, beta = 100, 500, 10.0
    patterns = unit_patterns(count, dim, seed=0)
    generator = torch.Generator().manual_seed(1)
    # Queries near stored patterns, so the kernel sums are far from vanishing.
    nearby = torch.randint(0, count, (64,), generator=generator)
    queries = patterns[nearby] + 0.2 * torch.randn(64, dim, generator=generator) / math.sqrt(dim)
    exact = make_engine("rbf", dim, {"beta": beta})
    exact.add(patterns)
    exact_energy = exact.energy(queries).double()

    features = [5_000, 40_000, 200_000]
    errors = []
    for y in features:
        engine = drdam(dim, patterns, beta=beta, features=y, seed=2, keep_patterns=False)
        errors.append((engine.energy(queries).double() - exact_energy).abs().mean().item())

    log_y = torch.tensor(features, dtype=torch.float64).log()
    log_error = torch.tensor(errors, dtype=torch.float64).log()
    centred = log_y - log_y.mean()
    slope = (centred * (log_error - log_error.mean())).sum() / (centred**2).sum()
    assert errors[0] > errors[1] > errors[2], errors
    assert -0.7 <= slope <= -0.3, (slope, errors)


@pytest.mark.parametrize("feature_map", FEATURE_MAPS)
def test_feature_maps_estimate_the_gaussian_kernel(feature_map: str) -> None:
    dim, beta, features = 8, 2.0, 200_000
    # Norms near 0.5: the exponential maps' variance grows like exp(4β‖x‖²).
    x = 0.5 * torch.randn(6, dim, generator=torch.Generator().manual_seed(3)) / math.sqrt(dim)
    projection, offset = random_basis(features, dim, beta, seed=4, device="cpu")
    phi = random_features(x, projection, offset, beta, feature_map).double()
    estimate = phi @ phi.T
    exact = torch.exp(-beta / 2 * torch.cdist(x.double(), x.double()) ** 2)
    # Monte Carlo with 2·10^5 directions: standard errors below ~0.01 here.
    torch.testing.assert_close(estimate, exact, atol=0.03, rtol=0)


def test_basis_is_regenerated_from_the_seed() -> None:
    first = drdam(16, features=64, seed=123)
    again = drdam(16, features=64, seed=123)
    other = drdam(16, features=64, seed=124)
    assert torch.equal(first.projection, again.projection) and torch.equal(first.offset, again.offset)
    assert not torch.equal(first.projection, other.projection)
    # √β is folded into the projection.
    scaled = drdam(16, features=64, seed=123, beta=4.0)
    torch.testing.assert_close(scaled.projection, 2 * first.projection)


def test_memory_vector_is_the_sum_of_pattern_features_after_add_and_remove() -> None:
    dim = 12
    patterns = unit_patterns(9, dim, seed=5)
    engine = drdam(dim, patterns, beta=3.0, features=256, feature_map="expexp", seed=6, keep_patterns=False)
    engine.remove(2, patterns[2])
    engine.remove(0, patterns[0])
    remaining = patterns[[1, 3, 4, 5, 6, 7, 8]]
    phi = random_features(remaining.double(), engine.projection.double(), engine.offset.double(), 3.0, "expexp")
    torch.testing.assert_close(engine.memory.double(), phi.sum(dim=0), atol=1e-5, rtol=1e-5)
    assert engine.count == 7


def test_without_patterns_the_nearest_memory_is_unknown_and_state_is_smaller() -> None:
    dim = 10
    patterns = unit_patterns(40, dim, seed=7)
    lean = drdam(dim, patterns, features=128, seed=8, keep_patterns=False)
    full = drdam(dim, patterns, features=128, seed=8, keep_patterns=True)
    lean_result, full_result = lean.run(patterns[:3], steps=2), full.run(patterns[:3], steps=2)
    assert lean_result.nearest.eq(-1).all() and lean_result.similarity.isnan().all()
    assert full_result.nearest.ge(0).all()
    torch.testing.assert_close(lean_result.states, full_result.states)
    assert lean.nbytes() < full.nbytes()
    serving = lean.memory.nbytes + lean.projection.nbytes + lean.offset.nbytes
    assert lean.nbytes() == serving


def test_chunked_feature_sums_equal_the_direct_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    dim, features = 6, 50
    x = torch.randn(37, dim, generator=torch.Generator().manual_seed(9))
    projection, offset = random_basis(features, dim, 1.5, seed=10, device="cpu")
    direct = random_features(x, projection, offset, 1.5, "sincos").sum(dim=0)
    monkeypatch.setattr(feature_module, "CHUNK_ELEMENTS", 3 * 2 * features)  # three rows per chunk
    assert feature_module.chunk_rows("sincos", features) == 3
    torch.testing.assert_close(feature_sum(x, projection, offset, 1.5, "sincos"), direct)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_matches_cpu() -> None:
    dim = 32
    patterns = unit_patterns(50, dim, seed=11)
    queries = patterns[:4] + 0.1 * torch.randn(4, dim, generator=torch.Generator().manual_seed(12))
    params = normalize_params("drdam", dim, {"features": 2048, "seed": 13})
    cpu, cuda = (make_engine("drdam", dim, params, device) for device in ("cpu", "cuda"))
    for engine in (cpu, cuda):
        engine.add(patterns)
    assert torch.equal(cpu.projection, cuda.projection.cpu())
    torch.testing.assert_close(cuda.run(queries).states, cpu.run(queries).states, atol=1e-4, rtol=1e-4)
