"""Two Triton replicas behind one gateway on a PostgreSQL store, with real processes: the gateway commits
writes itself, reads spread over the replicas, and SIGKILL of one replica under load costs clients
nothing; restarted, it reaches the survivor's exact bank."""

from __future__ import annotations

import os
import signal

import httpx

from service.banks.shards import REPLICA_ENV
from service.triton.launcher import TritonServer
from tests.faults.test_postgres_replicas import DIM, Readers
from tests.faults.writers import Writers
from tests.harness import ServerProcess
from tests.helpers import inference_counts, wait_until
from tests.triton.fixtures import MEMORY_ONLY, export_for_tests


def replica(root, repository, dsn: str, like: TritonServer | None = None, place: str | None = None) -> TritonServer:
    """A Triton following `dsn`, on free ports, or on those of `like` (the same replica restarted);
    `place` ("index/count") is its place in the gateway's replica list, for sharded banks."""
    ports = (like.http_port, like.grpc_port, like.metrics_port) if like else (0, 0, 0)
    root.mkdir(parents=True, exist_ok=True)
    env = {"AMSERVE_STORE": dsn} | ({REPLICA_ENV: place} if place else {})
    return TritonServer(repository, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
                        data_dir=root / "data", log_path=root / "tritonserver.log", env=env)


def test_reads_survive_a_replica_killed_under_load(tmp_path, postgres_dsn):
    repository = export_for_tests(tmp_path / "repository", tmp_path / "data", MEMORY_ONLY)
    first = replica(tmp_path / "r0", repository, postgres_dsn).start()
    second = replica(tmp_path / "r1", repository, postgres_dsn).start()
    gateway = ServerProcess(tmp_path / "gateway", backend="triton", extra_args=[
        "--triton-url", f"{first.url},{second.url}", "--store", postgres_dsn])
    try:
        gateway.start()
        with httpx.Client(base_url=gateway.url, timeout=60) as client:
            assert client.put("/v1/banks/load", json={"kind": "modern", "dim": DIM}).status_code == 201
            seed = client.post("/v1/banks/load/store", json={"patterns": [[1.0] * DIM], "ids": ["seed"]}).json()
            # Written by the gateway, read through either replica at once.
            for _ in range(4):
                read = client.post("/v1/banks/load/retrieve", json={"queries": [[1.0] * DIM],
                                                                    "min_version": seed["version"]})
                assert read.status_code == 200 and read.json()["results"][0]["nearest"]["id"] == "seed"
            assert wait_until(lambda: all(inference_counts(r.metrics_url, "associative_memory")[0] > 0
                                          for r in (first, second)), timeout=5), \
                "reads did not spread over both replicas"

            with Writers(gateway.url, "load", DIM, clients=2, timeout=15) as writers, \
                    Readers(gateway.url, "load", [1.0] * DIM) as readers:
                assert wait_until(lambda: len(writers.acknowledged) >= 20, timeout=60, interval=0.05)
                os.kill(first.pid, signal.SIGKILL)
                reads = len(readers.statuses)
                assert wait_until(lambda: len(readers.statuses) > reads + 30, timeout=60, interval=0.05)
                first.stop()  # ends what the kill left of its process group
                first = replica(tmp_path / "r0", repository, postgres_dsn, like=first).start()  # catches up
                acknowledged = len(writers.acknowledged)
                assert wait_until(lambda: len(writers.acknowledged) > acknowledged + 10, timeout=60, interval=0.05)
            assert set(readers.statuses) == {200}, f"clients saw failed reads: {sorted(set(readers.statuses))}"
            assert set(writers.statuses) == {200}, "writes depend on PostgreSQL alone, not on a replica"
            expected = len(writers.acknowledged_ids) + 1
            # No acknowledged store lost; the gateway reads its own writes back from a replica at once.
            assert client.get("/v1/banks/load").json()["count"] == expected

        def same_bank() -> bool:
            infos = []
            for server in (first, second):
                with ServerProcess(tmp_path / "check", backend="triton",
                                   extra_args=["--triton-url", server.url, "--store", postgres_dsn]) as one:
                    infos.append(httpx.get(f"{one.url}/v1/banks/load", timeout=30).json())
            return infos[0]["count"] == expected and all(
                (info["version"], info["checksum"]) == (infos[0]["version"], infos[0]["checksum"]) for info in infos)
        assert wait_until(same_bank, timeout=30, interval=1), "the restarted replica does not hold the survivor's bank"
    finally:
        gateway.stop()
        first.stop()
        second.stop()
