"""Replicas of one PostgreSQL store, measured side by side in one run (every process on this machine):

1. Replication lag: stores acknowledged by gateway A at a sustained open-loop rate (default 200/s) →
   the moment gateway B serves that bank version (B's bank info polled back to back). p50/p99.
2. Retrieve throughput through 1 and through 2 embedded replicas, driven by wrk (a compiled client):
   64 connections on one replica, then 32 on each of two at once.
3. One of two Triton replicas behind one gateway killed with SIGKILL under retrieve load, then
   restarted: client-visible errors and latency before, during and after.

    python loadtest/bench_replication.py [--rate 200] [--seconds 10]

Results → loadtest/results/replication.json. Needs PostgreSQL's server binaries (`make test` installs
them) and wrk (`apt-get install wrk`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.common import WRK_SCRIPT, wrk, wrk_result, write_results  # noqa: E402
from tests.harness import ServerProcess  # noqa: E402
from tests.postgres import PostgresCluster  # noqa: E402
from tests.triton.fixtures import MEMORY_ONLY, export_for_tests  # noqa: E402
from service.triton.launcher import TritonServer  # noqa: E402

DIM = 64
PATTERNS = 10_000
OBSERVE_EVERY_S = 0.005
NO_LM = ["--model", "none", "--max-in-flight", "4096", "--max-queue-size", "4096"]


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def summary_ms(seconds: list[float]) -> dict:
    return {"count": len(seconds), "p50_ms": 1e3 * statistics.median(seconds) if seconds else None,
            "p99_ms": 1e3 * percentile(seconds, 0.99) if seconds else None}


def fill_bank(url: str, bank: str, rng: np.random.Generator) -> np.ndarray:
    patterns = rng.standard_normal((PATTERNS, DIM)).astype(np.float32)
    with httpx.Client(base_url=url, timeout=120) as client:
        client.put(f"/v1/banks/{bank}", json={"kind": "modern", "dim": DIM, "params": {"beta": 0.5}}).raise_for_status()
        for start in range(0, PATTERNS, 1000):
            client.post(f"/v1/banks/{bank}/store", json={"patterns": patterns[start:start + 1000].tolist()}
                        ).raise_for_status()
    return patterns


# ----- 1. replication lag ---------------------------------------------------------------------


async def write_at_rate(a: str, bank: str, rate: float, seconds: float, out) -> None:
    """Open-loop stores through A (the schedule never waits for answers); sends (version, when
    acknowledged) per store, then None."""
    rng = np.random.default_rng(1)
    async with httpx.AsyncClient(base_url=a, timeout=30, limits=httpx.Limits(max_connections=64)) as writer:
        async def store(i: int) -> None:
            answer = await writer.post(f"/v1/banks/{bank}/store", json={"patterns": [rng.standard_normal(DIM).tolist()],
                                                                   "ids": [f"s{i}"]})
            out.put((answer.json()["version"], time.monotonic()) if answer.status_code == 200 else (None, None))

        start, tasks = time.monotonic(), []
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            tasks.append(asyncio.create_task(store(i)))
        await asyncio.gather(*tasks)
        out.put(("elapsed", time.monotonic() - start))


def writer_process(a: str, bank: str, rate: float, seconds: float, out) -> None:
    asyncio.run(write_at_rate(a, bank, rate, seconds, out))


def observe(b: str, bank: str, stop, out) -> None:
    """B's bank version, polled every OBSERVE_EVERY_S until `stop`: sends (when, version) pairs."""
    seen = []
    with httpx.Client(base_url=b, timeout=30) as reader:
        while not stop.is_set():
            answer = reader.get(f"/v1/banks/{bank}")
            if answer.status_code == 200:
                seen.append((time.monotonic(), answer.json()["version"]))
            time.sleep(OBSERVE_EVERY_S)
    out.put(seen)


def measure_lag(a: str, b: str, rate: float, seconds: float, bank: str) -> dict:
    """Writer and observer in processes of their own, so neither one's client work delays the other's
    timestamps (CLOCK_MONOTONIC is one clock for every process of the machine)."""
    httpx.put(f"{a}/v1/banks/{bank}", json={"kind": "modern", "dim": DIM}, timeout=30).raise_for_status()
    context = multiprocessing.get_context("spawn")
    acknowledged_queue, seen_queue, stop = context.Queue(), context.Queue(), context.Event()
    observer = context.Process(target=observe, args=(b, bank, stop, seen_queue))
    writer = context.Process(target=writer_process, args=(a, bank, rate, seconds, acknowledged_queue))
    observer.start()
    writer.start()
    acknowledged, failures, elapsed = {}, 0, None
    while elapsed is None:
        version, when = acknowledged_queue.get(timeout=seconds + 120)
        if version == "elapsed":
            elapsed = when
        elif version is None:
            failures += 1
        else:
            acknowledged[version] = when
    writer.join()
    time.sleep(1.0)  # let B catch up with the last ones
    stop.set()
    seen = seen_queue.get(timeout=60)
    observer.join()
    lags = []
    for version, when in acknowledged.items():
        first = next((t for t, v in seen if v >= version and t >= when), None)
        if first is not None:
            lags.append(first - when)
    poll = [later - earlier for (earlier, _), (later, _) in zip(seen, seen[1:])]
    return {"offered_rate": rate, "achieved_rate": len(acknowledged) / elapsed, "failures": failures,
            "lag": summary_ms(lags), "unseen": len(acknowledged) - len(lags),
            "observer_poll_p50_ms": 1e3 * statistics.median(poll) if poll else None}


# ----- 2. throughput with 1 and 2 replicas ----------------------------------------------------

def measure_throughput(a: str, b: str, query: list[float], seconds: float, work: Path) -> dict:
    script = work / "retrieve.lua"
    script.write_text(WRK_SCRIPT.format(body=json.dumps({"queries": [query], "steps": 3})))
    path = "/v1/banks/big/retrieve"
    one = wrk_result(wrk(a + path, 64, seconds, script))
    both = [wrk_result(p) for p in [wrk(url + path, 32, seconds, script) for url in (a, b)]]
    return {"one_replica": one, "two_replicas": {"per_replica": both, "rps": sum(r["rps"] for r in both)},
            "ratio": sum(r["rps"] for r in both) / one["rps"]}


# ----- 3. a Triton replica killed -------------------------------------------------------------


async def retrieve_load(url: str, query: list[float], seconds: float, clients: int, events: list) -> list:
    """(start time, latency, status) of every retrieve; status 0 when no answer came."""
    records: list[tuple[float, float, int]] = []
    stop_at = time.perf_counter() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        async def worker() -> None:
            while (started := time.perf_counter()) < stop_at:
                try:
                    status = (await client.post("/v1/banks/big/retrieve", json={"queries": [query], "steps": 3})
                              ).status_code
                except httpx.HTTPError:
                    status = 0
                records.append((started, time.perf_counter() - started, status))
        await asyncio.gather(*(worker() for _ in range(clients)), *(event() for event in events))
    return records


def measure_replica_kill(dsn: str, work: Path, query: list[float], seconds: float) -> dict:
    repository = export_for_tests(work / "repository", work / "data", MEMORY_ONLY)

    def replica(name: str, like: TritonServer | None = None) -> TritonServer:
        (work / name).mkdir(exist_ok=True)
        ports = (like.http_port, like.grpc_port, like.metrics_port) if like else (0, 0, 0)
        return TritonServer(repository, http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2],
                            log_path=work / name / "tritonserver.log", env={"AMSERVE_STORE": dsn})

    replicas = [replica("r0").start(), replica("r1").start()]
    marks: dict[str, float] = {}
    gateway = ServerProcess(work / "gateway", backend="triton", extra_args=[
        "--triton-url", ",".join(r.url for r in replicas), "--store", dsn, *NO_LM]).start()
    try:
        async def kill_and_restart() -> None:
            await asyncio.sleep(seconds / 3)
            marks["killed"] = time.perf_counter()
            os.kill(replicas[0].pid, signal.SIGKILL)
            await asyncio.sleep(seconds / 3)
            await asyncio.to_thread(replicas[0].stop)
            replicas[0] = replica("r0", like=replicas[0])
            await asyncio.to_thread(replicas[0].start)
            marks["restarted"] = time.perf_counter()

        records = asyncio.run(retrieve_load(gateway.url, query, seconds + 10, 8, [kill_and_restart]))
    finally:
        gateway.stop()
        for server in replicas:
            server.stop()
    phases = {"before": [r for r in records if r[0] < marks["killed"]],
              "one_replica_down": [r for r in records if marks["killed"] <= r[0] < marks.get("restarted", 1e18)],
              "after_restart": [r for r in records if r[0] >= marks.get("restarted", 1e18)]}
    return {name: {**summary_ms([latency for _, latency, status in rows if status == 200]),
                   "errors": sum(status != 200 for _, _, status in rows)} for name, rows in phases.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="stores per second through gateway A")
    parser.add_argument("--sustainable-rate", type=float, default=60.0,
                        help="a second, lower rate that gateway A keeps up with on a small machine")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest/results/replication.json")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install wrk")
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "dim": DIM, "patterns": PATTERNS, "seconds": args.seconds}
    with tempfile.TemporaryDirectory(prefix="amserve-replication-") as scratch, PostgresCluster() as postgres:
        work = Path(scratch)
        dsn = postgres.create_database("bench")
        a = ServerProcess(work / "a", extra_args=["--store", dsn, *NO_LM]).start()
        b = ServerProcess(work / "b", extra_args=["--store", dsn, *NO_LM]).start()
        try:
            # At the rate asked for, and at one this machine sustains, so the lag is not queueing alone.
            results["lag"] = {f"{rate:g}/s": measure_lag(a.url, b.url, rate, args.seconds, f"lag{i}")
                              for i, rate in enumerate((args.rate, args.sustainable_rate))}
            print("lag", json.dumps(results["lag"]), flush=True)
            patterns = fill_bank(a.url, "big", np.random.default_rng(0))
            query = (patterns[7] + 0.1).tolist()
            httpx.post(f"{b.url}/v1/banks/big/retrieve", json={"queries": [query]}, timeout=60).raise_for_status()
            results["throughput"] = measure_throughput(a.url, b.url, query, args.seconds, work)
            print("throughput", json.dumps(results["throughput"]), flush=True)
        finally:
            a.stop()
            b.stop()
        results["replica_kill"] = measure_replica_kill(dsn, work / "triton", query, args.seconds)
        print("replica kill", json.dumps(results["replica_kill"]), flush=True)
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
