"""Both stores, SQLite and PostgreSQL, pass the same tests: versions advance once per committed write,
the change log replays to the same bank, ids stay idempotent; and replicas of a PostgreSQL store follow
each other's writes."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.banks.registry import Bank, BankRegistry
from service.banks.store import BankRecord, open_store
from service.engines.memory import normalize_params
from service.errors import AlreadyExists, Conflict, InvalidArgument, NotFound, Unavailable
from tests.helpers import wait_until

DIM = 4


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request, tmp_path):
    """Where a store lives: a data dir, or a fresh PostgreSQL database."""
    return str(tmp_path) if request.param == "sqlite" else request.getfixturevalue("postgres_dsn")


def same_bank(one, other) -> bool:
    """Equal contents at equal versions; `bytes` may differ (a replica loaded at once holds a tighter buffer)."""
    return one.model_dump(exclude={"bytes"}) == other.model_dump(exclude={"bytes"})


def eye(*rows: int) -> np.ndarray:
    return np.eye(DIM, dtype=np.float32)[list(rows)]


def test_every_committed_write_advances_the_version_once(location):
    store = open_store(location)
    record = store.create_bank(BankRecord("b", "modern", DIM, {"beta": 1.0}))
    assert record.version == 0 and len(record.uid) == 32
    with pytest.raises(AlreadyExists):
        store.create_bank(BankRecord("b", "modern", DIM, {}))
    assert store.store_patterns("b", ["x", "y"], eye(0, 1)) == (1, [0, 1], 2)
    assert store.store_patterns("b", ["x", "y"], eye(0, 1)) == (1, [], 2)  # a retry commits nothing
    assert store.store_patterns("b", ["y", "z"], eye(1, 2)) == (2, [1], 3)  # only z is new
    with pytest.raises(Conflict) as conflict:
        store.store_patterns("b", ["w", "x"], eye(3, 3))
    assert conflict.value.field == "ids[1]"
    assert store.bank("b").version == 2  # the failed write left nothing, w included
    version, vector = store.delete_pattern("b", "x")
    assert version == 3 and np.array_equal(vector, eye(0)[0])
    with pytest.raises(NotFound) as missing:
        store.delete_pattern("b", "x")
    assert missing.value.field == "id"
    with pytest.raises(NotFound) as gone:
        store.store_patterns("nope", ["a"], eye(0))
    assert gone.value.field == "bank"

    changes = store.changes(store.bank("b"), after=0)
    assert [(c.version, c.op, c.ids) for c in changes] == [(1, "store", ["x", "y"]), (2, "store", ["z"]),
                                                          (3, "delete", ["x"])]
    assert np.array_equal(changes[1].vectors, eye(2))
    assert [c.version for c in store.changes(store.bank("b"), after=2)] == [3]
    version, chunks = store.snapshot(store.bank("b"))
    assert version == 3 and [ids for ids, _ in chunks] == [["y", "z"]]
    store.close()


def test_a_recreated_bank_is_a_new_bank(location):
    store = open_store(location)
    first = store.create_bank(BankRecord("b", "modern", DIM, {}))
    store.store_patterns("b", ["x"], eye(0))
    store.delete_bank("b")
    second = store.create_bank(BankRecord("b", "rbf", DIM, {}))
    assert second.uid != first.uid and store.bank("b").version == 0
    assert store.changes(first, after=0) == [] and store.changes(second, after=0) == []
    with pytest.raises(NotFound):
        store.snapshot(first)
    store.close()


def test_a_malformed_dsn_names_the_setting():
    with pytest.raises(InvalidArgument) as error:
        open_store("postgresql://amserve@127.0.0.1:notaport/db")
    assert error.value.field == "store"
    with pytest.raises(InvalidArgument):
        open_store("mysql://somewhere/db")


def test_an_unreachable_postgresql_is_a_quick_503(postgres):
    started = time.monotonic()
    with pytest.raises(Unavailable):
        open_store(f"postgresql://amserve@127.0.0.1:{postgres.port + 1}/nothing")  # nobody listens there
    assert time.monotonic() - started < 30


# ----- replaying the log ----------------------------------------------------------------------

WRITES = st.lists(st.tuples(st.sampled_from(["store", "delete"]), st.lists(st.integers(0, 5), min_size=1,
                                                                           max_size=3, unique=True)),
                  min_size=1, max_size=12)


def replay(registry: BankRegistry, name: str) -> dict[int, tuple[str, set[str]]]:
    """The bank at every version, from its change log alone: {version: (checksum, ids)}."""
    store = registry.store
    record = store.bank(name)
    bank = Bank(record, torch.device("cpu"))
    states = {0: (bank.info().checksum, set())}
    for change in store.changes(record, after=0):
        bank.apply(change)
        states[bank.version] = (bank.info().checksum, held_ids(bank))
    return states


def held_ids(bank: Bank) -> set[str]:
    return {pid for partition in bank.partitions for pid in partition.ids}


@pytest.mark.parametrize("kind, params", [("modern", {}), ("drdam", {"features": 32, "keep_patterns": False}),
                                          ("rbf", {"shards": 3})])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(writes=WRITES)
def test_serving_state_at_every_version_is_a_replay_of_the_log(location, kind, params, writes):
    registry = BankRegistry(open_store(location))
    name = f"b{time.monotonic_ns()}"
    registry.create(name, kind, DIM, normalize_params(kind, DIM, params))
    rng = np.random.default_rng(len(writes))
    vectors = {i: rng.standard_normal(DIM).astype(np.float32) for i in range(6)}
    seen = {0: (registry.info(name).checksum, set())}

    def record() -> None:  # the served bank after each committed write
        info = registry.info(name)
        seen[info.version] = (info.checksum, held_ids(registry._banks[name]))

    for op, picks in writes:
        if op == "store":
            registry.store_patterns(name, np.stack([vectors[i] for i in picks]), [f"p{i}" for i in picks])
            record()
            continue
        for i in picks:
            try:
                registry.delete_pattern(name, f"p{i}")
            except NotFound:
                continue
            record()
    assert replay(registry, name) == seen
    reloaded = BankRegistry(open_store(location))  # a replica starting now: snapshot, then the log
    assert same_bank(reloaded.info(name), registry.info(name))
    registry.store.close()
    reloaded.store.close()


# ----- replicas of one PostgreSQL store -------------------------------------------------------


def test_replicas_follow_each_other_through_postgresql(postgres_dsn):
    a, b = BankRegistry(open_store(postgres_dsn)), BankRegistry(open_store(postgres_dsn))
    b.store.wait_for_changes(0.01)  # b listens before a writes (the follower thread may start late)
    stop = threading.Event()
    follower = threading.Thread(target=b.follow, args=(stop,), kwargs={"poll": 5.0})  # NOTIFY wakes it sooner
    follower.start()
    try:
        a.create("m", "modern", DIM, {"beta": 4.0})
        _, _, version = a.store_patterns("m", eye(0, 1, 2), ["x", "y", "z"])
        assert wait_until(lambda: "m" in b and b.version("m") == version, timeout=4), "no notification arrived"
        assert same_bank(b.info("m"), a.info("m"))
        # A write through b reaches a on demand (read-your-writes), before any notification.
        version = b.delete_pattern("m", "y")
        a.at_version("m", version, timeout=2.0)
        assert same_bank(a.info("m"), b.info("m")) and a.info("m").count == 2
        a.delete("m")
        assert wait_until(lambda: "m" not in b, timeout=4)
    finally:
        stop.set()
        follower.join()
        a.store.close()
        b.store.close()


def test_min_version_past_the_last_commit_is_the_requests_error(location):
    registry = BankRegistry(open_store(location))
    registry.create("m", "modern", DIM, {})
    _, _, version = registry.store_patterns("m", eye(0), ["x"])
    registry.at_version("m", version)
    with pytest.raises(InvalidArgument) as error:
        registry.at_version("m", version + 1, timeout=5.0)  # at once: no replica will ever have it
    assert error.value.field == "min_version"
    registry.store.close()


def test_a_replica_that_cannot_reach_its_store_is_503(postgres):
    """A replica behind the version a read asks for, with PostgreSQL gone: 503 with Retry-After once the
    bound has passed (the store's own answer comes first when it is quicker)."""
    dsn = postgres.create_database("unreachable")
    writer, reader = BankRegistry(open_store(dsn)), BankRegistry(open_store(dsn))
    writer.create("m", "modern", DIM, {})
    reader.sync()
    _, _, version = writer.store_patterns("m", eye(0), ["x"])
    postgres.stop()
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable) as error:
            reader.at_version("m", version, timeout=0.5)
        assert time.monotonic() - started < 15 and error.value.retry_after >= 1
        assert reader.info("m").version == 0  # still served, at the version it has
    finally:
        postgres.start()
        writer.store.close()
        reader.store.close()
