"""Sharded banks, measured side by side in one run on this machine:

1. Per-step cost of a bank of N patterns (default 1M × 64) unsharded and split into 2 and 4 local shards
   (the same engine code, one process: what the merge and the split cost, the work being equal), for
   modern and rbf; the merge alone and one shard's partial alone.
2. Round-trip overhead per step over Triton: one bank sharded over two Triton replicas (each step a
   fan-out from the gateway) against the same patterns unsharded (all steps inside one Triton), the
   per-step latency difference through the same gateway.

    python loadtest/bench_shards.py [--patterns 1000000] [--dim 64] [--batch 32]

Results → loadtest/results/shards.json. Part 2 needs PostgreSQL's server binaries (`make test` installs them).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.common import write_results  # noqa: E402
from service.engines.memory import make_engine, normalize_params  # noqa: E402
from service.engines.memory.shards import merge  # noqa: E402
from tests.faults.test_triton_replicas import replica  # noqa: E402
from tests.harness import ServerProcess  # noqa: E402
from tests.postgres import PostgresCluster  # noqa: E402
from tests.triton.fixtures import MEMORY_ONLY, export_for_tests  # noqa: E402

REPEATS = 5
STEPS = 5
NO_LM = ["--model", "none"]


def sharded(kind: str, params: dict, patterns: torch.Tensor, shards: int):
    """A front engine over `shards` local partitions (an even split), or the plain engine for 1."""
    if shards == 1:
        engine = make_engine(kind, patterns.shape[1], params)
        engine.add(patterns)
        return engine, [engine]
    parts = []
    for rows in patterns.chunk(shards):
        part = make_engine(kind, patterns.shape[1], params)
        part.add(rows)
        parts.append(part)
    front = make_engine(kind, patterns.shape[1], {**params, "shards": shards})
    front.fan_out(lambda states: [part.partial(states) for part in parts])
    return front, parts


def per_step_ms(run) -> float:
    """Median over REPEATS of (a run of STEPS steps − a run of none) / STEPS: the steps alone."""
    run(1)
    samples = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        run(STEPS)
        middle = time.perf_counter()
        run(0)
        samples.append(((middle - started) - (time.perf_counter() - middle)) / STEPS)
    return 1e3 * statistics.median(samples)


def median_ms(call) -> float:
    call()
    samples = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return 1e3 * statistics.median(samples)


def shard_costs(kind: str, params: dict, patterns: torch.Tensor, queries: torch.Tensor, shards: int) -> dict:
    engine, parts = sharded(kind, params, patterns, shards)
    partials = [part.partial(queries) for part in parts]
    return {"step_ms": per_step_ms(lambda steps: engine.run(queries, steps=steps, tolerance=0.0)),
            "partial_ms": median_ms(lambda: parts[0].partial(queries)), "merge_ms": median_ms(lambda: merge(partials))}


def local_costs(patterns: torch.Tensor, queries: torch.Tensor) -> dict:
    results = {}
    for kind in ("modern", "rbf"):
        params = normalize_params(kind, patterns.shape[1], {"beta": 4.0})
        by_shards = {}
        for shards in (1, 2, 4):
            by_shards[shards] = shard_costs(kind, params, patterns, queries, shards)
            print(kind, shards, "shards", by_shards[shards], flush=True)
        results[kind] = {"by_shards": by_shards,
                         "ratio_2_to_1": by_shards[2]["step_ms"] / by_shards[1]["step_ms"],
                         "ratio_4_to_1": by_shards[4]["step_ms"] / by_shards[1]["step_ms"]}
    return results


def round_trip(work: Path, dim: int, count: int, batch: int) -> dict:
    """Per-step latency through one gateway: a bank sharded over two Triton replicas vs unsharded."""
    rng = np.random.default_rng(0)
    patterns = rng.standard_normal((count, dim)).astype(np.float32)
    queries = (patterns[:batch] + 0.3 * rng.standard_normal((batch, dim))).astype(np.float32).tolist()
    with PostgresCluster() as postgres:
        dsn = postgres.create_database("bench")
        repository = export_for_tests(work / "repository", work / "data", MEMORY_ONLY)
        replicas = [replica(work / f"r{i}", repository, dsn, place=f"{i}/2").start() for i in range(2)]
        gateway = ServerProcess(work / "gateway", backend="triton", extra_args=[
            "--triton-url", ",".join(r.url for r in replicas), "--store", dsn, *NO_LM]).start()
        try:
            with httpx.Client(base_url=gateway.url, timeout=300) as client:
                for name, params in (("whole", {"beta": 4.0}), ("split", {"beta": 4.0, "shards": 2})):
                    client.put(f"/v1/banks/{name}", json={"kind": "modern", "dim": dim, "params": params}
                               ).raise_for_status()
                    for start in range(0, count, 2000):
                        version = client.post(f"/v1/banks/{name}/store", json={
                            "patterns": patterns[start:start + 2000].tolist(),
                            "ids": [f"p{i}" for i in range(start, min(start + 2000, count))]}).json()["version"]

                def retrieve(name: str):
                    # Over the API a retrieve runs at least one step: steps + 1, so the difference is STEPS steps.
                    return lambda steps: client.post(f"/v1/banks/{name}/retrieve", json={
                        "queries": queries, "steps": steps + 1, "tolerance": 1e-30, "min_version": version}
                    ).raise_for_status()
                whole, split = per_step_ms(retrieve("whole")), per_step_ms(retrieve("split"))
        finally:
            gateway.stop()
            for server in replicas:
                server.stop()
    return {"patterns": count, "dim": dim, "batch": batch, "unsharded_step_ms": whole, "sharded_step_ms": split,
            "round_trip_overhead_ms": split - whole}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patterns", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="queries evaluated per step")
    parser.add_argument("--triton-patterns", type=int, default=20_000, help="bank size for the round-trip part")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest/results/shards.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    patterns = torch.randn(args.patterns, args.dim)
    patterns /= patterns.norm(dim=-1, keepdim=True)
    queries = patterns[:args.batch] + 0.3 * torch.randn(args.batch, args.dim) / args.dim ** 0.5
    results = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                           "torch_threads": torch.get_num_threads()},
               "patterns": args.patterns, "dim": args.dim, "batch": args.batch, "steps": STEPS,
               "local": local_costs(patterns, queries)}
    del patterns
    with tempfile.TemporaryDirectory(prefix="amserve-shards-") as scratch:
        results["triton_round_trip"] = round_trip(Path(scratch), args.dim, args.triton_patterns, args.batch)
    print("round trip", results["triton_round_trip"], flush=True)
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
