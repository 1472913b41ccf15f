"""GET /v1/banks/{bank}/fidelity on every backend: DrDAM against the exact rbf energy, the numbers
checked against a computation made here from the formulas (closed-form exact gradient)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from service.engines.memory.features import random_basis, random_features
from tests.api.test_rest import create, error

DIM, COUNT, BETA, FEATURES, SEED = 16, 8, 0.5, 4096, 7


def drdam_bank(client, bank, keep_patterns=True) -> np.ndarray:
    create(client, bank, "drdam", DIM, beta=BETA, features=FEATURES, seed=SEED, keep_patterns=keep_patterns)
    patterns = np.sign(np.random.default_rng(3).standard_normal((COUNT, DIM))).astype(np.float32)
    assert client.post(f"/v1/banks/{bank}/store", json={"patterns": patterns.tolist()}).status_code == 200
    return patterns


def exact_energy_and_gradient(states: np.ndarray, patterns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """E = −(1/β) log Σ_μ exp(−β/2 ‖v − ξ_μ‖²) and ∇E = v − Σ_μ softmax_μ ξ_μ, in float64."""
    v, xi = states.astype(np.float64), patterns.astype(np.float64)
    logits = -BETA / 2 * ((v[:, None, :] - xi[None]) ** 2).sum(-1)
    top = logits.max(-1, keepdims=True)
    weights = np.exp(logits - top)
    energy = -(top[:, 0] + np.log(weights.sum(-1))) / BETA
    return energy, v - (weights / weights.sum(-1, keepdims=True)) @ xi


def drdam_energy_and_gradient(states: np.ndarray, patterns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ẽ = −(1/β) log ⟨φ(v), Σ_μ φ(ξ_μ)⟩ with the bank's basis, differentiated by autograd."""
    projection, offset = random_basis(FEATURES, DIM, BETA, SEED, "cpu")
    memory = random_features(torch.from_numpy(patterns), projection, offset, BETA, "sincos").sum(0)
    v = torch.from_numpy(states).requires_grad_()
    energy = -torch.log(random_features(v, projection, offset, BETA, "sincos") @ memory) / BETA
    (gradient,) = torch.autograd.grad(energy.sum(), v)
    return energy.detach().double().numpy(), gradient.double().numpy()


def test_fidelity_matches_an_independent_computation(client, bank_name):
    patterns = drdam_bank(client, bank_name)
    r = client.get(f"/v1/banks/{bank_name}/fidelity", params={"sample_size": 100})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["sample_size"] == COUNT and report["version"] == 1  # capped at what is stored
    exact, exact_gradient = exact_energy_and_gradient(patterns, patterns)
    approximate, approximate_gradient = drdam_energy_and_gradient(patterns, patterns)
    errors = np.abs(approximate - exact)
    cosines = (exact_gradient * approximate_gradient).sum(-1) / (
        np.linalg.norm(exact_gradient, axis=-1) * np.linalg.norm(approximate_gradient, axis=-1))
    at_patterns = report["patterns"]
    assert at_patterns["mean_abs_energy_error"] == pytest.approx(errors.mean(), rel=1e-3, abs=1e-5)
    assert at_patterns["max_abs_energy_error"] == pytest.approx(errors.max(), rel=1e-3, abs=1e-5)
    assert at_patterns["mean_gradient_cosine"] == pytest.approx(cosines.mean(), abs=2e-3)
    assert at_patterns["min_gradient_cosine"] == pytest.approx(cosines.min(), abs=2e-3)
    # 4096 features approximate well; exact and DrDAM retrieval agree on well separated patterns.
    assert report["noisy"]["mean_abs_energy_error"] < 0.5 and report["noisy"]["mean_gradient_cosine"] > 0.5
    assert report["same_nearest"] == 1.0
    assert not math.isnan(report["noisy"]["min_gradient_cosine"])


def test_fidelity_needs_the_kept_patterns(client, bank_name):
    drdam_bank(client, bank_name, keep_patterns=False)
    body = error(client.get(f"/v1/banks/{bank_name}/fidelity"), 409, "bank")
    assert "keep_patterns" in body["message"]


def test_fidelity_is_for_drdam_banks_and_bounds_its_sample(client, bank_name):
    create(client, bank_name, "rbf", DIM)
    error(client.get(f"/v1/banks/{bank_name}/fidelity"), 422, "bank")
    error(client.get(f"/v1/banks/{bank_name}/fidelity", params={"sample_size": 100_000}), 422, "sample_size")
    error(client.get(f"/v1/banks/{bank_name}/fidelity", params={"noise": -1}), 422, "noise")
    error(client.get("/v1/banks/no-such-bank/fidelity"), 404, "bank")
