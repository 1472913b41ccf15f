"""Energies and dynamics of every memory kind against the equations of DESIGN.md §4."""

from __future__ import annotations

import math

import pytest
import torch

from service.engines.memory import make_engine, normalize_params
from service.engines.memory.drdam import drdam_energy
from service.engines.memory.features import feature_sum, random_basis, random_features
from service.engines.memory.modern import modern_energy
from service.engines.memory.rbf import rbf_energy
from service.errors import Conflict, InvalidArgument
from tests.engines.memory_cases import CASES, build

DIM = 24

def problem(kind: str, count: int = 12, batch: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored patterns and cues: ±1 with 30% of the bits flipped, or unit-norm with noise."""
    generator = torch.Generator().manual_seed(seed)
    if kind in ("classical", "dense"):
        patterns = torch.randint(0, 2, (count, DIM), generator=generator).float() * 2 - 1
        flips = torch.rand(batch, DIM, generator=generator) < 0.3
        cues = torch.where(flips, -patterns[:batch], patterns[:batch])
        return patterns, cues
    patterns = torch.randn(count, DIM, generator=generator)
    patterns /= patterns.norm(dim=-1, keepdim=True)
    cues = patterns[:batch] + 0.4 * torch.randn(batch, DIM, generator=generator) / math.sqrt(DIM)
    return patterns, cues


# ----- independent float64 references, written from the equations -----------------------


def reference_energy(case: str, states: torch.Tensor, patterns: torch.Tensor) -> torch.Tensor:
    kind, params = CASES[case]
    v, xi = states.double(), patterns.double()
    overlaps = v @ xi.T
    if kind == "classical":
        weights = sum(torch.outer(p, p) for p in xi)
        weights -= torch.diag(torch.diag(weights))
        return -0.5 * torch.einsum("bi,ij,bj->b", v, weights, v)
    if kind == "dense" and params["energy"] == "poly":
        return -(torch.relu(overlaps) ** params["n"]).sum(-1) / params["n"]
    beta = params["beta"]
    if kind == "dense":
        return -torch.log(torch.exp(beta * overlaps).sum(-1)) / beta
    if kind == "modern":
        max_norm = xi.norm(dim=-1).max()
        lse = torch.log(torch.exp(beta * overlaps).sum(-1)) / beta
        return -lse + 0.5 * (v * v).sum(-1) + math.log(len(xi)) / beta + 0.5 * max_norm**2
    kernel = torch.exp(-beta / 2 * torch.cdist(v, xi) ** 2)
    if kind == "rbf":
        return -torch.log(kernel.sum(-1)) / beta
    return -torch.log(drdam_reference_similarity(params, v, xi).clamp_min(1e-300)) / beta


def drdam_reference_similarity(params: dict, v: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """⟨φ(v), Σ φ(ξ)⟩ with the basis redrawn from the seed as documented: S ~ N(0,1), b ~ U(0, 2π)."""
    generator = torch.Generator().manual_seed(params["seed"])
    features = params["features"]
    s = torch.randn(features, v.shape[1], generator=generator).double()
    b = torch.rand(features, generator=generator).double() * 2 * math.pi
    beta = params["beta"]

    def phi(x: torch.Tensor) -> torch.Tensor:
        angle = math.sqrt(beta) * x @ s.T
        damping = beta * (x * x).sum(-1, keepdim=True)
        return {
            "sincos": lambda: torch.cat([torch.cos(angle + b), torch.sin(angle + b)], -1) / math.sqrt(features),
            "cos": lambda: math.sqrt(2 / features) * torch.cos(angle + b),
            "exp": lambda: torch.exp(angle - damping) / math.sqrt(features),
            "expexp": lambda: torch.cat([torch.exp(angle - damping), torch.exp(-angle - damping)], -1)
            / math.sqrt(2 * features),
        }[params["feature_map"]]()

    return phi(v) @ phi(xi).sum(0)


def is_non_increasing(trace: list[float], slack: float) -> bool:
    return all(after <= before + slack * max(1.0, abs(before)) for before, after in zip(trace, trace[1:]))


# Modern's update is exact, not backtracked: allow float32 rounding in its energies.
SLACK = {"modern": 1e-6}


@pytest.mark.parametrize("case", CASES)
def test_energy_matches_equations(case: str) -> None:
    patterns, cues = problem(CASES[case][0])
    engine = build(case, patterns)
    states = torch.where(cues >= 0, 1.0, -1.0) if engine.binary else cues
    expected = reference_energy(case, states, patterns)
    torch.testing.assert_close(engine.energy(states).double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("clamped", [False, True], ids=["free", "clamped"])
@pytest.mark.parametrize("case", CASES)
def test_energy_never_increases_along_the_dynamics(case: str, clamped: bool) -> None:
    kind = CASES[case][0]
    patterns, cues = problem(kind)
    engine = build(case, patterns)
    clamp = torch.rand(cues.shape, generator=torch.Generator().manual_seed(5)) < 0.3 if clamped else None
    result = engine.run(cues, clamp=clamp, steps=60, trace=True)

    assert result.steps.sum() > 0, "the dynamics never moved: the check would be vacuous"
    start = torch.where(cues >= 0, 1.0, -1.0) if engine.binary else cues
    initial = reference_energy(case, start, patterns)
    final = reference_energy(case, result.states, patterns)
    for i, row in enumerate(result.trace):
        trace = row[: result.steps[i] + 1].tolist()
        assert torch.isnan(row[result.steps[i] + 1:]).all(), "entries past a query's last step are NaN"
        assert is_non_increasing(trace, SLACK.get(kind, 0.0)), trace
        assert trace[0] == pytest.approx(initial[i].item(), rel=1e-4, abs=1e-4)
        assert trace[-1] == pytest.approx(result.energy[i].item())
        assert result.energy[i].item() == pytest.approx(final[i].item(), rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_clamped_entries_never_move(case: str) -> None:
    kind = CASES[case][0]
    patterns, cues = problem(kind, seed=3)
    engine = build(case, patterns)
    clamp = torch.rand(cues.shape, generator=torch.Generator().manual_seed(7)) < 0.5
    result = engine.run(cues, clamp=clamp, steps=40)

    start = torch.where(cues >= 0, 1.0, -1.0) if engine.binary else cues
    assert torch.equal(result.states[clamp], start[clamp])
    assert not torch.equal(result.states[~clamp], start[~clamp]), "no free entry moved"


def test_binary_unknown_entries_start_from_their_sign() -> None:
    patterns, cues = problem("classical")
    engine = build("classical", patterns)
    cues = cues * torch.rand(cues.shape, generator=torch.Generator().manual_seed(1))
    cues[:, :5] = 0.0
    result = engine.run(cues, steps=0)
    expected = torch.where(cues > 0, 1.0, -1.0)
    expected[:, :5] = 1.0
    assert torch.equal(result.states, expected)
    assert result.steps.eq(0).all()


def naive_async(
    case: str, state: torch.Tensor, free: torch.Tensor, patterns: torch.Tensor, sweeps: int
) -> torch.Tensor:
    """Sweep the units in order; flip a unit iff the flip strictly lowers the reference energy."""
    state = state.clone()
    for _ in range(sweeps):
        changed = False
        for unit in range(DIM):
            if not free[unit]:
                continue
            flipped = state.clone()
            flipped[unit] = -flipped[unit]
            pair = reference_energy(case, torch.stack([state, flipped]), patterns)
            if pair[1] < pair[0]:
                state, changed = flipped, True
        if not changed:
            break
    return state


@pytest.mark.parametrize("case", ["classical", "dense-poly", "dense-exp"])
def test_binary_sweeps_match_a_naive_asynchronous_update(case: str) -> None:
    patterns, cues = problem("classical", count=6, batch=5, seed=9)
    engine = build(case, patterns)
    clamp = torch.zeros(cues.shape, dtype=torch.bool)
    clamp[1, ::3] = True
    result = engine.run(cues, clamp=clamp, steps=50)
    for i in range(len(cues)):
        expected = naive_async(case, cues[i], ~clamp[i], patterns, sweeps=50)
        assert torch.equal(result.states[i], expected)
        assert result.converged[i]
        # A converged state is a fixed point: no single free flip lowers the energy.
        assert torch.equal(naive_async(case, expected, ~clamp[i], patterns, sweeps=1), expected)


@pytest.mark.parametrize("case", ["classical", "dense-poly"])
def test_binary_ties_keep_the_current_sign(case: str) -> None:
    # With these two patterns unit 0 has zero local field (W01 = W02 = 0), and for the cubic
    # energy flipping it only swaps the two overlaps (3, 1) ↔ (1, 3): neither lowers E.
    patterns = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]])
    kind, params = CASES[case]
    engine = make_engine(kind, 3, normalize_params(kind, 3, params))
    engine.add(patterns)
    result = engine.run(patterns, steps=10)
    assert torch.equal(result.states, patterns)
    assert result.steps.eq(0).all() and result.converged.all()


def test_binary_step_limit_reports_unconverged_states() -> None:
    patterns, cues = problem("classical", count=5, batch=5, seed=2)
    engine = build("classical", patterns)
    full = engine.run(cues, steps=50)
    assert (full.steps >= 2).any(), "pick data that needs several sweeps"
    cut = engine.run(cues, steps=1)
    assert torch.equal(cut.converged, full.steps <= 1)


def test_modern_recovers_1000_patterns_in_one_step() -> None:
    dim, count, flipped_bits = 64, 1000, 13  # 13/64 ≈ 20% of the entries
    generator = torch.Generator().manual_seed(0)
    patterns = torch.randint(0, 2, (count, dim), generator=generator).float() * 2 - 1
    flips = torch.rand(count, dim, generator=generator).argsort(dim=-1)[:, :flipped_bits]
    cues = patterns.clone()
    cues.scatter_(1, flips, -cues.gather(1, flips))
    engine = make_engine("modern", dim, normalize_params("modern", dim, {"beta": 10.0}))
    engine.add(patterns)

    result = engine.run(cues, steps=1)

    # Reference: with large β one step lands on the pattern of largest overlap with the cue.
    overlaps = cues @ patterns.T
    top2 = overlaps.topk(2, dim=-1)
    best = top2.indices[:, 0]
    unique = top2.values[:, 0] > top2.values[:, 1]
    torch.testing.assert_close(result.states[unique], patterns[best[unique]], atol=1e-3, rtol=0)
    recovered = (result.states - patterns).abs().amax(dim=-1) < 1e-3
    assert recovered.float().mean() >= 0.995
    assert torch.equal(result.nearest[recovered], torch.arange(count)[recovered])
    assert result.steps.eq(1).all()


def test_modern_step_is_a_gradient_step_on_its_energy() -> None:
    patterns, cues = problem("modern", seed=4)
    beta, step_size = CASES["modern"][1]["beta"], 0.5
    engine = build("modern", patterns)
    result = engine.run(cues, steps=1, step_size=step_size, tolerance=0.0)

    states = cues.double().requires_grad_()
    (gradient,) = torch.autograd.grad(modern_energy(states, patterns.double(), beta).sum(), states)
    torch.testing.assert_close(result.states.double(), cues.double() - step_size * gradient, atol=1e-5, rtol=1e-5)


def test_rbf_unit_step_is_the_fixed_point_update() -> None:
    patterns, cues = problem("rbf", seed=6)
    beta = CASES["rbf"][1]["beta"]
    engine = build("rbf", patterns)
    result = engine.run(cues, steps=1, tolerance=0.0)

    weights = torch.softmax(-beta / 2 * torch.cdist(cues.double(), patterns.double()) ** 2, dim=-1)
    torch.testing.assert_close(result.states.double(), weights @ patterns.double(), atol=1e-5, rtol=1e-5)
    assert result.steps.eq(1).all()


@pytest.mark.parametrize(
    ("kind", "params"),
    [
        ("modern", {"beta": 8.0}),
        ("rbf", {"beta": 16.0}),
        ("drdam", {"beta": 16.0, "features": 4096, "feature_map": "sincos", "seed": 3}),
    ],
    ids=["modern", "rbf", "drdam"],
)
def test_continuous_dynamics_reach_stationary_points(kind: str, params: dict) -> None:
    # A large β separates the patterns: each cue falls into its own well and converges fast.
    patterns, cues = problem(kind, seed=8)
    engine = make_engine(kind, DIM, normalize_params(kind, DIM, params))
    engine.add(patterns)
    result = engine.run(cues, steps=500, tolerance=1e-5)
    assert result.converged.all()
    assert (result.steps > 1).any()

    beta = params["beta"]
    energy = {
        "modern": lambda v: modern_energy(v, patterns, beta),
        "rbf": lambda v: rbf_energy(v, patterns, beta),
        "drdam": lambda v: drdam_energy(v, engine.memory, engine.projection, engine.offset, beta, "sincos"),
    }[kind]
    start, end = (torch.func.grad(lambda v: energy(v).sum())(x) for x in (cues, result.states))
    assert end.abs().max() < 1e-2 * start.abs().max()


@pytest.mark.parametrize("case", ["classical", "dense-poly", "modern", "rbf", "drdam-sincos"])
def test_engines_work_the_same_inside_inference_mode(case: str) -> None:
    patterns, cues = problem(CASES[case][0], seed=10)
    expected = build(case, patterns).run(cues, steps=5)
    with torch.inference_mode():
        result = build(case, patterns).run(cues, steps=5)
    assert torch.equal(result.states, expected.states)
    assert torch.equal(result.steps, expected.steps)


def test_gradients_match_finite_differences() -> None:
    generator = torch.Generator().manual_seed(0)
    patterns = torch.randn(7, 5, generator=generator, dtype=torch.float64) / math.sqrt(5)
    states = (patterns[:3] + 0.2 * torch.randn(3, 5, generator=generator, dtype=torch.float64)).requires_grad_()
    beta = 3.0

    assert torch.autograd.gradcheck(lambda v: rbf_energy(v, patterns, beta), (states,))
    assert torch.autograd.gradcheck(lambda v: modern_energy(v, patterns, beta), (states,))
    for feature_map in ("sincos", "cos", "exp", "expexp"):
        projection, offset = random_basis(512, 5, beta, seed=1, device="cpu")
        projection, offset = projection.double(), offset.double()
        memory = feature_sum(patterns, projection, offset, beta, feature_map)

        def energy(v: torch.Tensor) -> torch.Tensor:
            return drdam_energy(v, memory, projection, offset, beta, feature_map)

        assert (random_features(states, projection, offset, beta, feature_map) @ memory > 0).all(), "clipped"
        assert torch.autograd.gradcheck(energy, (states,)), feature_map


@pytest.mark.parametrize("case", ["classical", "dense-poly", "modern", "rbf", "drdam-sincos"])
def test_empty_bank_conflicts(case: str) -> None:
    kind, params = CASES[case]
    engine = make_engine(kind, DIM, normalize_params(kind, DIM, params))
    with pytest.raises(Conflict):
        engine.run(torch.ones(1, DIM))
    with pytest.raises(Conflict):
        engine.energy(torch.ones(1, DIM))


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"steps": -1}, "steps"),
        ({"step_size": 0.0}, "step_size"),
        ({"tolerance": -1.0}, "tolerance"),
    ],
)
def test_bad_run_arguments_name_the_field(arguments: dict, field: str) -> None:
    patterns, cues = problem("rbf", batch=2)
    engine = build("rbf", patterns)
    arguments = {"queries": cues} | arguments
    with pytest.raises(InvalidArgument) as error:
        engine.run(arguments.pop("queries"), **arguments)
    assert error.value.field == field


def test_modern_rejects_steps_that_could_raise_the_energy() -> None:
    patterns, cues = problem("modern")
    with pytest.raises(InvalidArgument) as error:
        build("modern", patterns).run(cues, step_size=2.0)
    assert error.value.field == "step_size"
