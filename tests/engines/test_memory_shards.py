"""A bank split into shards retrieves what the same bank unsharded retrieves: the log-sum-exp merge
of per-shard partials is exact (service/engines/memory/shards.py)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from service.engines.memory import make_engine, normalize_params
from service.engines.memory.shards import merge
from service.errors import Conflict, InvalidArgument


def split(kind: str, dim: int, params: dict, patterns: torch.Tensor, owner: list[int], shards: int):
    """A sharded front engine over local shard engines; pattern i lives in shard owner[i]. Returns the
    front and, per shard, the global index of each of its rows."""
    parts, rows = [], []
    for shard in range(shards):
        members = [i for i, s in enumerate(owner) if s == shard]
        part = make_engine(kind, dim, params)
        if members:
            part.add(patterns[members])
        parts.append(part)
        rows.append(members)
    front = make_engine(kind, dim, {**params, "shards": shards})
    front.fan_out(lambda states: [part.partial(states) for part in parts])
    return front, rows


@st.composite
def sharded_banks(draw):
    kind = draw(st.sampled_from(["modern", "rbf"]))
    dim = draw(st.integers(1, 12))
    count = draw(st.integers(1, 40))
    shards = draw(st.integers(1, 8))
    beta = draw(st.sampled_from([0.5, 1.0, 4.0, 30.0, 200.0, 1000.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(count, dim, generator=generator)
    if draw(st.booleans()):  # unit norm, as stored embeddings usually are
        patterns /= patterns.norm(dim=-1, keepdim=True)
    if draw(st.booleans()) and count > 1:  # ties: some patterns stored twice (in other shards)
        copies = draw(st.integers(1, count // 2))
        patterns[count - copies:] = patterns[:copies].clone()
    owner = [draw(st.integers(0, shards - 1)) for _ in range(count)]  # some shards may stay empty
    queries = patterns[torch.randint(0, count, (draw(st.integers(1, 6)),), generator=generator)]
    queries = queries + draw(st.sampled_from([0.0, 0.1, 0.5, 2.0])) * torch.randn(queries.shape, generator=generator)
    clamp = torch.rand(queries.shape, generator=generator) < 0.3 if draw(st.booleans()) else None
    return kind, dim, beta, patterns, owner, shards, queries, clamp


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sharded_banks(), st.booleans())
def test_a_sharded_bank_retrieves_what_the_unsharded_bank_retrieves(bank, trace):
    kind, dim, beta, patterns, owner, shards, queries, clamp = bank
    params = normalize_params(kind, dim, {"beta": beta})
    whole = make_engine(kind, dim, params)
    whole.add(patterns)
    front, rows = split(kind, dim, params, patterns, owner, shards)

    note(f"{kind} dim={dim} count={len(patterns)} shards={shards} beta={beta} owner={owner}")
    expected = whole.run(queries, clamp=clamp, trace=trace)
    got = front.run(queries, clamp=clamp, trace=trace)
    # The float32 noise floor: the same bank unsharded, its patterns in reverse order (its softmax summed in
    # another order), with its queries one ulp larger, and with each pattern entry one ulp off in a random
    # direction (a shard's product rounds an overlap one ulp apart from the whole bank's, and β = 1000 near
    # a tie makes that 3.2e-4 in an intermediate energy; seen on 27 patterns of dim 7, whose final states
    # agreed exactly). A descent that passes near a saddle amplifies that rounding (seen: 2.4e-5 in the
    # states after 20 steps; 1.8e-5 in a trace entry from one ulp of the queries, whose final states moved
    # 2e-7), and the merge may move it as much, no more.
    reversed_bank = make_engine(kind, dim, params)
    reversed_bank.add(patterns.flip(0))
    floor = reversed_bank.run(queries, clamp=clamp, trace=trace)
    nudged = [whole.run(queries * (1 + 2**-23), clamp=clamp, trace=trace)]
    for seed in range(4):  # each flips a given near-tie's rounding about half the time
        signs = torch.randint(0, 2, patterns.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
        jittered = make_engine(kind, dim, params)
        jittered.add(patterns * (1 + signs * 2**-23))
        nudged.append(jittered.run(queries, clamp=clamp, trace=trace))
    floors = [floor] + [f for f in nudged if torch.equal(f.steps, expected.steps)]
    amplified = 4 * max((f.states - expected.states).abs().max().item() for f in floors)
    tolerance = max(1e-5, amplified)

    if torch.equal(floor.steps, expected.steps):  # else the step count itself is decided by rounding
        assert torch.equal(got.steps, expected.steps)
        assert torch.equal(got.converged, expected.converged)
    torch.testing.assert_close(got.states, expected.states, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(got.energy, expected.energy, rtol=1e-5, atol=tolerance)
    if trace and torch.equal(floor.steps, expected.steps):
        trace_floor = 4 * max((f.trace - expected.trace).nan_to_num().abs().max().item() for f in floors)
        torch.testing.assert_close(got.trace, expected.trace, rtol=1e-5, atol=max(tolerance, trace_floor),
                                   equal_nan=True)
    if clamp is not None:
        assert torch.equal(got.states[clamp], queries[clamp])
    # The same pattern, or one exactly as similar (patterns stored twice, or every pattern of a sign in 1-D).
    found = torch.tensor([rows[s][r] for s, r in zip(got.shard.tolist(), got.nearest.tolist())])
    cosines = torch.nn.functional.cosine_similarity(got.states.double()[:, None], patterns.double()[None], dim=-1)
    best = cosines.amax(dim=-1)
    assert torch.allclose(cosines.gather(1, found[:, None])[:, 0], best, rtol=0, atol=1e-6)
    unique = (cosines >= best[:, None] - 1e-6).sum(dim=-1) == 1
    assert torch.equal(found[unique], expected.nearest[unique])
    torch.testing.assert_close(got.similarity, expected.similarity, rtol=1e-5, atol=max(1e-6, amplified))


@pytest.mark.parametrize("kind", ["modern", "rbf"])
def test_the_merge_is_the_log_sum_exp_over_every_pattern(kind):
    generator = torch.Generator().manual_seed(3)
    patterns, states = torch.randn(30, 5, generator=generator), torch.randn(4, 5, generator=generator)
    params = normalize_params(kind, 5, {"beta": 7.0})
    parts = [make_engine(kind, 5, params) for _ in range(3)]
    for i, part in enumerate(parts[:2]):  # the third shard stays empty
        part.add(patterns[i * 15:(i + 1) * 15])
    merged = merge([part.partial(states) for part in parts])

    p, v = patterns.double(), states.double()
    logits = 7.0 * v @ p.T if kind == "modern" else -3.5 * torch.cdist(v, p) ** 2
    torch.testing.assert_close(merged.lse, torch.logsumexp(logits, dim=-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.mean.double(), torch.softmax(logits, dim=-1) @ p, rtol=1e-5, atol=1e-5)
    assert merged.count == 30
    assert merged.max_norm == pytest.approx(p.norm(dim=-1).max().item())


def test_a_sharded_bank_with_every_shard_empty_has_nothing_to_retrieve():
    params = normalize_params("modern", 3, {"shards": 4})
    front, _ = split("modern", 3, params, torch.zeros(0, 3), [], 4)
    with pytest.raises(Conflict):
        front.run(torch.ones(1, 3))


@pytest.mark.parametrize(("params", "field"), [({"shards": 0}, "params.shards"), ({"shards": 65}, "params.shards"),
                                                ({"shards": 1.5}, "params.shards")])
def test_shard_counts_are_checked(params, field):
    with pytest.raises(InvalidArgument) as error:
        normalize_params("rbf", 3, params)
    assert error.value.field == field


def test_an_unsharded_banks_params_read_as_before():
    assert normalize_params("modern", 3, {"beta": 2, "shards": 1}) == {"beta": 2.0}
    assert normalize_params("modern", 3, {"shards": 3}) == {"beta": 1.0, "shards": 3}
    assert math.isfinite(normalize_params("rbf", 3, {})["beta"])
