"""Sharded banks in the registry: placement, routing by id, and answers equal to an unsharded bank's."""

from __future__ import annotations

import numpy as np
import pytest

from service.banks.registry import BankRegistry, DynamicsOptions
from service.banks.shards import Placement, replicas_of, shard_of
from service.banks.store import open_store
from service.errors import Unavailable

DIM = 6


def test_a_pattern_goes_to_the_shard_its_id_hashes_to_on_every_machine():
    # Fixed values: a change of hash would move every stored pattern of every sharded bank.
    assert [shard_of(f"p{i}", 4) for i in range(8)] == [1, 0, 0, 1, 1, 1, 0, 0]
    assert [shard_of(pid, 7) for pid in ("alice", "bob", "carol", "dave")] == [0, 4, 2, 6]
    counts = np.bincount([shard_of(f"id-{i}", 4) for i in range(4000)], minlength=4)
    assert counts.min() > 900  # spread evenly


@pytest.mark.parametrize(("shard", "replicas", "expected"),
                         [(0, 1, [0]), (3, 1, [0]), (0, 2, [0, 1]), (1, 2, [1, 0]), (2, 3, [2, 0]), (5, 4, [1, 2])])
def test_each_shard_is_served_by_replicas_s_and_s_plus_one_mod_r(shard, replicas, expected):
    assert replicas_of(shard, replicas) == expected
    assert [Placement(index, replicas).holds(shard) for index in range(replicas)] == \
        [index in expected for index in range(replicas)]


@pytest.fixture
def registry(tmp_path):
    return BankRegistry(open_store(tmp_path))


def fill(registry: BankRegistry, name: str, kind: str, params: dict, patterns: np.ndarray) -> None:
    registry.create(name, kind, DIM, params)
    registry.store_patterns(name, patterns, [f"p{i}" for i in range(len(patterns))])


@pytest.mark.parametrize("kind", ["modern", "rbf"])
def test_a_sharded_bank_answers_as_the_unsharded_bank_with_the_same_patterns(registry, kind):
    rng = np.random.default_rng(4)
    patterns = rng.standard_normal((50, DIM)).astype(np.float32)
    fill(registry, "whole", kind, {"beta": 3.0}, patterns)
    fill(registry, "split", kind, {"beta": 3.0, "shards": 4}, patterns)
    registry.delete_pattern("whole", "p7")
    registry.delete_pattern("split", "p7")
    queries = patterns[[1, 2, 3, 30]] + 0.3 * rng.standard_normal((4, DIM)).astype(np.float32)
    mask = np.zeros_like(queries, dtype=bool)
    mask[:, 0] = True
    for clamp in (None, mask):
        options = DynamicsOptions(trace=True)
        parts = [registry.check_queries(name, queries, clamp) for name in ("whole", "split")]
        (whole,), (split,) = (registry.run_batch(name, [part], options) for name, part in zip(("whole", "split"), parts))
        assert split.nearest == whole.nearest
        np.testing.assert_array_equal(split.steps, whole.steps)
        np.testing.assert_allclose(split.states, whole.states, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(split.trace, whole.trace, rtol=1e-5, atol=1e-5)

    info = registry.info("split")
    assert info.count == 49 and info.params == {"beta": 3.0, "shards": 4}
    assert [shard.shard for shard in info.shards] == [0, 1, 2, 3]
    assert [shard.count for shard in info.shards] == list(np.bincount(
        [shard_of(f"p{i}", 4) for i in range(50) if i != 7], minlength=4))
    assert all(shard.replicas == ["local"] for shard in info.shards)
    assert [(s.shard, s.count, s.replicas) for s in registry.info("whole").shards] == [(0, 49, ["local"])]
    assert info.checksum == registry.info("whole").checksum  # the same patterns, however split


def test_a_replica_holds_only_the_shards_placed_on_it(tmp_path):
    store = open_store(tmp_path)
    writer = BankRegistry(store)
    patterns = np.random.default_rng(1).standard_normal((40, DIM)).astype(np.float32)
    fill(writer, "split", "modern", {"shards": 3}, patterns)
    replica = BankRegistry(open_store(tmp_path), placement=Placement(0, 3))  # shards 0 and 2
    info = replica.info("split")
    assert info.count == 40 and info.checksum == writer.info("split").checksum
    assert [shard.replicas for shard in info.shards] == [["replica 0", "replica 1"], ["replica 1", "replica 2"],
                                                         ["replica 2", "replica 0"]]
    assert 0 < info.bytes < writer.info("split").bytes
    states = [replica.check_queries("split", patterns[:2], None)[0], replica.check_queries("split", patterns[5:6], None)[0]]
    for shard in (0, 2):
        answers = replica.partial_batch("split", shard, 3, states)
        expected = writer.partial_batch("split", shard, 3, states)
        assert [ids for _, ids in answers] == [ids for _, ids in expected] and [len(ids) for _, ids in answers] == [2, 1]
        for (partial, _), (reference, _) in zip(answers, expected):
            assert partial.count == reference.count > 0
            np.testing.assert_array_equal(partial.total.numpy(), reference.total.numpy())
            np.testing.assert_array_equal(partial.weighted.numpy(), reference.weighted.numpy())
    with pytest.raises(Unavailable) as error:
        replica.partial_batch("split", 1, 3, states)
    assert "shard 1" in error.value.message
