"""Gateways as replicas of one PostgreSQL store, with real processes: a write through one is read through
another, PostgreSQL stopped under load refuses writes with 503 while reads go on, and a replica killed
with SIGKILL comes back to the survivor's exact bank."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import numpy as np

from tests.faults.writers import Writers
from tests.harness import ServerProcess
from tests.helpers import metric_value, wait_until

DIM = 16
NO_LM = ["--model", "none"]


def replica(tmp_path, name: str, dsn: str) -> ServerProcess:
    return ServerProcess(tmp_path / name, extra_args=["--store", dsn, *NO_LM])


class Readers:
    """Threads retrieving from `url` until stopped, recording every status (no answer = 0)."""

    def __init__(self, url: str, bank: str, query: list[float], clients: int = 2, max_requests: int = 100_000):
        self.url, self.bank, self.query, self.max_requests = url, bank, query, max_requests
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._read) for _ in range(clients)]

    def _read(self) -> None:
        with httpx.Client(base_url=self.url, timeout=15) as http:
            for _ in range(self.max_requests):
                if self._stop.is_set():
                    return
                try:
                    status = http.post(f"/v1/banks/{self.bank}/retrieve", json={"queries": [self.query]}).status_code
                except httpx.HTTPError:
                    status = 0
                self.statuses.append(status)

    def __enter__(self) -> Readers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def test_a_write_through_one_gateway_is_read_through_another(tmp_path, postgres_dsn):
    with replica(tmp_path, "a", postgres_dsn) as a, replica(tmp_path, "b", postgres_dsn) as b, \
            httpx.Client(base_url=a.url, timeout=30) as through_a, httpx.Client(base_url=b.url, timeout=30) as through_b:
        assert through_a.put("/v1/banks/shared", json={"kind": "modern", "dim": DIM}).status_code == 201
        pattern = np.eye(DIM, dtype=np.float32)[3].tolist()
        stored = through_a.post("/v1/banks/shared/store", json={"patterns": [pattern], "ids": ["x"]}).json()

        # With the version the write answered, B answers from state that has it: at once.
        read = through_b.post("/v1/banks/shared/retrieve", json={"queries": [pattern], "min_version": stored["version"]})
        assert read.status_code == 200, read.text
        assert read.json()["results"][0]["nearest"]["id"] == "x"

        # Without it, B has it within the replication lag (NOTIFY wakes its follower).
        second = through_a.post("/v1/banks/shared/store", json={"patterns": [np.eye(DIM)[4].tolist()], "ids": ["y"]})
        started = time.monotonic()
        assert wait_until(lambda: through_b.get("/v1/banks/shared").json()["version"] == second.json()["version"],
                          timeout=5, interval=0.01)
        assert time.monotonic() - started < 2.0

        # A deletion through B is gone on A, and both hold the same bank.
        deleted = through_b.delete("/v1/banks/shared/patterns/x")
        version = int(deleted.headers["Amserve-Bank-Version"])
        after = through_a.post("/v1/banks/shared/retrieve", json={"queries": [pattern], "min_version": version})
        assert after.json()["results"][0]["nearest"]["id"] == "y"
        info_a, info_b = through_a.get("/v1/banks/shared").json(), through_b.get("/v1/banks/shared").json()
        assert (info_a["version"], info_a["checksum"], info_a["count"]) == (info_b["version"], info_b["checksum"], 1)
        # B applied A's writes from the change log and measured how long after their commit.
        text = through_b.get("/metrics").text
        applied = metric_value(text, "amserve_replication_lag_seconds_count")
        assert applied >= 2 and metric_value(text, "amserve_replication_lag_seconds_sum") / applied < 2.0


def test_postgresql_stopped_under_load_refuses_writes_and_keeps_reads(tmp_path, postgres, postgres_dsn):
    with replica(tmp_path, "a", postgres_dsn) as gateway, httpx.Client(base_url=gateway.url, timeout=30) as client:
        client.put("/v1/banks/load", json={"kind": "modern", "dim": DIM}).raise_for_status()
        client.post("/v1/banks/load/store", json={"patterns": [[1.0] * DIM], "ids": ["seed"]}).raise_for_status()
        with Writers(gateway.url, "load", DIM, clients=2, timeout=10) as writers, \
                Readers(gateway.url, "load", [1.0] * DIM) as readers:
            assert wait_until(lambda: len(writers.acknowledged) >= 20, timeout=60, interval=0.05)
            postgres.stop()
            try:
                down_from = len(writers.statuses)
                assert wait_until(lambda: len(writers.statuses) - down_from >= 10, timeout=60, interval=0.05)
                ready = client.get("/healthz/ready")
                assert ready.status_code == 200 and wait_until(
                    lambda: client.get("/healthz/ready").json()["degraded"] == ["store"], timeout=10)
                reads_while_down = len(readers.statuses)
                assert wait_until(lambda: len(readers.statuses) - reads_while_down >= 20, timeout=30)
            finally:
                postgres.start()
            resumed_from = len(writers.acknowledged)
            assert wait_until(lambda: len(writers.acknowledged) > resumed_from + 5, timeout=60, interval=0.05), \
                "writes did not resume after PostgreSQL came back"
        refused = writers.statuses[down_from:]
        assert set(writers.statuses) <= {200, 503}, set(writers.statuses)  # never a 500, never a hang
        assert refused.count(503) >= 10 and all(value and int(value) >= 1 for value in writers.retry_after)
        assert set(readers.statuses) == {200}, "a read failed while PostgreSQL was away"
        assert wait_until(lambda: client.get("/healthz/ready").json()["degraded"] == [], timeout=10)
    # Every acknowledged store is in PostgreSQL, unchanged: a replica starting now loads them, and storing
    # them again is a no-op (a 503'd store whose commit went through before the connection broke may be
    # there too, hence at least).
    with replica(tmp_path, "fresh", postgres_dsn) as fresh, httpx.Client(base_url=fresh.url, timeout=30) as check:
        info = check.get("/v1/banks/load").json()
        assert info["count"] >= len(writers.acknowledged_ids) + 1
        for ids, vectors in writers.acknowledged:
            again = check.post("/v1/banks/load/store", json={"patterns": vectors, "ids": ids}).json()
            assert (again["count"], again["version"]) == (info["count"], info["version"])


def test_a_replica_killed_under_load_comes_back_to_the_survivors_bank(tmp_path, postgres_dsn):
    survivor, victim = replica(tmp_path, "a", postgres_dsn).start(), replica(tmp_path, "b", postgres_dsn).start()
    try:
        httpx.put(f"{survivor.url}/v1/banks/load", json={"kind": "modern", "dim": DIM}).raise_for_status()
        httpx.post(f"{survivor.url}/v1/banks/load/store", json={"patterns": [[1.0] * DIM]}).raise_for_status()
        with Writers(survivor.url, "load", DIM, clients=2, timeout=10) as writers, \
                Readers(survivor.url, "load", [1.0] * DIM) as readers:
            assert wait_until(lambda: len(writers.acknowledged) >= 20, timeout=60, interval=0.05)
            assert victim.kill(signal.SIGKILL) == -signal.SIGKILL
            victim = replica(tmp_path, "b", postgres_dsn).start()  # catches up while the writes go on
            acknowledged = len(writers.acknowledged)
            assert wait_until(lambda: len(writers.acknowledged) > acknowledged + 10, timeout=60, interval=0.05)
        assert set(readers.statuses) == {200} and set(writers.statuses) == {200}
        info = httpx.get(f"{survivor.url}/v1/banks/load").json()
        assert info["count"] == len(writers.acknowledged_ids) + 1  # no acknowledged store lost

        def same_bank() -> bool:
            other = httpx.get(f"{victim.url}/v1/banks/load").json()
            return (other["version"], other["checksum"]) == (info["version"], info["checksum"])
        assert wait_until(same_bank, timeout=10), "the restarted replica does not hold the survivor's bank"
    finally:
        victim.stop()
        survivor.stop()


def test_a_triton_replica_and_an_embedded_one_share_their_banks(tmp_path, postgres_dsn):
    """Triton's associative_memory model opens the same PostgreSQL and follows its change log."""
    triton = ServerProcess(tmp_path / "t", backend="triton", extra_args=["--store", postgres_dsn])
    with triton, replica(tmp_path, "e", postgres_dsn) as embedded, \
            httpx.Client(base_url=triton.url, timeout=60) as through_triton, \
            httpx.Client(base_url=embedded.url, timeout=60) as through_embedded:
        assert through_triton.put("/v1/banks/both", json={"kind": "rbf", "dim": DIM}).status_code == 201
        pattern = np.eye(DIM, dtype=np.float32)[5].tolist()
        stored = through_triton.post("/v1/banks/both/store", json={"patterns": [pattern], "ids": ["t"]}).json()
        read = through_embedded.post("/v1/banks/both/retrieve",
                                     json={"queries": [pattern], "min_version": stored["version"]})
        assert read.status_code == 200 and read.json()["results"][0]["nearest"]["id"] == "t"
        other = np.eye(DIM, dtype=np.float32)[6].tolist()
        second = through_embedded.post("/v1/banks/both/store", json={"patterns": [other], "ids": ["e"]}).json()
        read = through_triton.post("/v1/banks/both/retrieve", json={"queries": [other], "min_version": second["version"]})
        assert read.status_code == 200 and read.json()["results"][0]["nearest"]["id"] == "e"
        assert wait_until(lambda: through_triton.get("/v1/banks/both").json()["checksum"]
                          == through_embedded.get("/v1/banks/both").json()["checksum"], timeout=5)
