"""BankRegistry over SQLite: rebuild after restart, swap-removal bookkeeping, idempotency, storage faults."""

from __future__ import annotations

import numpy as np
import pytest

from service.banks.registry import BankRegistry, DynamicsOptions, MemoryResults
from service.banks.store import SQLiteStore
from service.errors import AlreadyExists, Conflict, InvalidArgument, NotFound, Unavailable


def registry_at(path) -> BankRegistry:
    return BankRegistry(SQLiteStore(path))


def run(registry: BankRegistry, name: str, queries, clamp=None, options=DynamicsOptions()) -> MemoryResults:
    """One request, checked and run as a batch of one, as both backends do."""
    return registry.run_batch(name, [registry.check_queries(name, queries, clamp)], options)[0]


def test_restart_rebuilds_banks_rows_and_ids_after_deletions(tmp_path):
    rng = np.random.default_rng(0)
    patterns = rng.standard_normal((6, 16)).astype(np.float32)
    ids = [f"p{i}" for i in range(6)]
    first = registry_at(tmp_path)
    first.create("m", "modern", 16, {"beta": 30.0})
    first.create("d", "drdam", 16, {"features": 256, "seed": 3})
    for name in ("m", "d"):
        first.store_patterns(name, patterns, ids)
        first.delete_pattern(name, "p1")  # swap-removal moves p5 into row 1
        first.delete_pattern(name, "p3")
    before = run(first, "m", patterns, options=DynamicsOptions(steps=5))
    before_d = run(first, "d", patterns, options=DynamicsOptions(steps=5))
    first.store.close()

    again = registry_at(tmp_path)
    assert [b.name for b in again.list()] == ["d", "m"]
    assert again.info("m").count == 4 and again.info("d").params["seed"] == 3
    after = run(again, "m", patterns, options=DynamicsOptions(steps=5))
    after_d = run(again, "d", patterns, options=DynamicsOptions(steps=5))
    for b, a in ((before, after), (before_d, after_d)):
        assert a.nearest == b.nearest
        np.testing.assert_allclose(a.similarity, b.similarity, atol=1e-5)
        np.testing.assert_allclose(a.states, b.states, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.energy, b.energy, rtol=1e-5, atol=1e-6)
    assert [after.nearest[i] for i in (0, 2, 4, 5)] == ["p0", "p2", "p4", "p5"]


def test_nearest_ids_follow_swap_removal(tmp_path):
    registry = registry_at(tmp_path)
    registry.create("b", "modern", 3, {"beta": 50.0})
    eye = np.eye(3, dtype=np.float32)
    registry.store_patterns("b", eye, ["x", "y", "z"])
    registry.delete_pattern("b", "x")  # z moves into x's row
    assert run(registry, "b", eye[1:]).nearest == ["y", "z"]


def test_store_idempotency_and_conflicts(tmp_path):
    registry = registry_at(tmp_path)
    registry.create("b", "modern", 2, {})
    assert registry.store_patterns("b", np.array([[1, 0]], np.float32), ["a"]) == (["a"], 1, 1)
    assert registry.store_patterns("b", np.array([[1, 0]], np.float32), ["a"]) == (["a"], 1, 1)  # no new version
    with pytest.raises(Conflict) as info:
        registry.store_patterns("b", np.array([[0, 1]], np.float32), ["a"])
    assert info.value.field == "ids[0]"
    with pytest.raises(AlreadyExists):
        registry.create("b", "modern", 2, {})
    with pytest.raises(NotFound):
        registry.store_patterns("nope", np.array([[1, 0]], np.float32), None)
    with pytest.raises(InvalidArgument) as info:
        registry.create("Bad", "modern", 2, {})
    assert info.value.field == "bank"


def test_deleted_bank_is_gone_after_restart(tmp_path):
    registry = registry_at(tmp_path)
    registry.create("b", "modern", 2, {})
    registry.store_patterns("b", np.array([[1, 0]], np.float32), ["a"])
    registry.delete("b")
    registry.create("b", "rbf", 2, {})  # same name, fresh bank
    registry.store.close()
    again = registry_at(tmp_path)
    assert again.info("b").kind == "rbf" and again.info("b").count == 0


def test_failed_commit_leaves_serving_state_unchanged(tmp_path):
    registry = registry_at(tmp_path)
    registry.create("b", "modern", 2, {})
    registry.store.close()  # every later write fails inside the store
    with pytest.raises(Unavailable):
        registry.store_patterns("b", np.array([[1, 0]], np.float32), ["a"])
    assert registry.info("b").count == 0


def test_queries_and_masks_are_checked_against_the_bank(tmp_path):
    registry = registry_at(tmp_path)
    registry.create("b", "modern", 4, {})
    registry.create("c", "classical", 4, {})
    cues = np.ones((2, 4), np.float32)
    for queries, clamp, field in [
        (np.ones((2, 5), np.float32), None, "queries"),            # the bank's dim
        (np.ones((0, 4), np.float32), None, "queries"),            # empty
        (cues, np.ones((3, 4), bool), "mask"),                     # mask shape
        (cues, np.ones((2, 4), np.float32), "mask"),               # mask type
    ]:
        with pytest.raises(InvalidArgument) as info:
            registry.check_queries("b", queries, clamp)
        assert info.value.field == field
    with pytest.raises(InvalidArgument) as info:  # binary kinds take ±1 cues
        registry.check_queries("c", np.full((1, 4), 0.5, np.float32), None)
    assert info.value.field == "queries"
    registry.check_queries("c", np.full((1, 4), 0.5, np.float32), np.ones((1, 4), bool))  # a completion may


def test_a_batch_splits_into_one_result_per_request(tmp_path):
    registry = registry_at(tmp_path)
    registry.create("b", "modern", 3, {"beta": 50.0})
    eye = np.eye(3, dtype=np.float32)
    registry.store_patterns("b", eye, ["x", "y", "z"])
    parts = [registry.check_queries("b", eye[i:j], None) for i, j in ((0, 2), (2, 3))]
    first, second = registry.run_batch("b", parts, DynamicsOptions(trace=True))
    assert (first.nearest, second.nearest) == (["x", "y"], ["z"])
    assert first.states.shape == (2, 3) and second.trace.shape[0] == 1
    assert first == run(registry, "b", eye[:2], options=DynamicsOptions(trace=True))
