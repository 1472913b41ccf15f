"""Retrieve throughput and latency: raw engine vs REST vs gRPC, batching on vs off, 1/8/64 clients.

Banks (built straight into the data dir through the registry, so set-up does not go through JSON):
  small  modern D=64,  K=10k  — per-request HTTP cost dominates
  large  modern D=256, K=100k — ~100 MB; one query is a memory-bound pass, a batch is one GEMM
  drdam  drdam  D=64,  K=10k, Y=4096 sincos features
  tiny   modern D=64,  K=16   — wrk only: the engine's share is negligible, so its rate is the gateway's own

"Raw engine" calls the bank's engine in-process with the batch sizes the server's batcher formed in the
matching run (read from its /metrics), so the ratio REST / raw shows what the gateway costs. It calls it
from a worker thread with the server's malloc and OpenMP settings, as the embedded server calls it: libgomp lets
OpenMP workers spin between parallel regions only while a process has no more OpenMP threads than cores,
and a team started from a thread other than the first one exceeds that on two cores. The wrk cells also
report the engine called from the first thread of a fresh process of its own (OpenMP's default wait
policy: spinning workers, a rate no server process with an event loop has on two cores), and the ratios
against it.
Every figure is measured in this one run; results go to loadtest/results/retrieve.json.

Via Triton: the same REST/gRPC requests with `--backend triton` (the gateway's batches, then Triton's
own dynamic batcher).

The Python client shares the cores with the server and measures itself too, so REST is also driven by
wrk (a compiled client; `apt-get install wrk`), 64 connections, one query per request, as JSON floats
and as base64 ("encoding_format": "base64"); each wrk rate is divided by the engine's own rate at the
batch size the server formed during that run, measured right after it while the server idles (rounds
differ by up to a third on a shared machine, so each round's ratio has both figures from the same
minute); every wrk cell is run `--rounds` times in turn and reports the medians of its rates and of its
rounds' ratios (loadtest/results/retrieve_wrk.json).

    python loadtest/bench_retrieve.py [--seconds 4] [--clients 1,8,64] [--banks small,large,drdam]
                                      [--backends embedded,triton] [--only wrk] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import grpc
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.cli import OPENMP_WAIT, set_openmp_wait, tune_process  # noqa: E402 - imports no torch

set_openmp_wait()  # the servers' OpenMP settings for the engine-alone runs too, before torch loads

import torch  # noqa: E402

from service.api.pb import amserve_pb2 as pb  # noqa: E402
from service.api.pb import amserve_pb2_grpc as pb_grpc  # noqa: E402
from service.banks.store import SQLiteStore  # noqa: E402
from service.banks.registry import BankRegistry, DynamicsOptions  # noqa: E402
from tests.harness import ServerProcess  # noqa: E402
from loadtest.common import WRK_SCRIPT, batch_rows, wrk, wrk_result, write_results  # noqa: E402
from loadtest.load import drive  # noqa: E402

BANKS = {
    "small": {"kind": "modern", "dim": 64, "count": 10_000, "params": {"beta": 1.0}},
    "large": {"kind": "modern", "dim": 256, "count": 100_000, "params": {"beta": 1.0}},
    "drdam": {"kind": "drdam", "dim": 64, "count": 10_000, "params": {"beta": 1.0, "features": 4096, "seed": 7}},
    "tiny": {"kind": "modern", "dim": 64, "count": 16, "params": {"beta": 1.0}},
}
STEPS = 3  # fixed work per query, so every configuration does the same arithmetic
WRK_CONNECTIONS = 64
# The engine called as the embedded server calls it: from one long-lived worker thread.
ENGINE_THREAD = ThreadPoolExecutor(1, thread_name_prefix="engine")


def build_banks(data_dir: Path, names: list[str]) -> None:
    registry = BankRegistry(SQLiteStore(data_dir))
    rng = np.random.default_rng(0)
    for name in names:
        spec = BANKS[name]
        registry.create(name, spec["kind"], spec["dim"], spec["params"])
        for start in range(0, spec["count"], 10_000):
            patterns = rng.standard_normal((min(10_000, spec["count"] - start), spec["dim"])).astype(np.float32)
            patterns /= np.linalg.norm(patterns, axis=1, keepdims=True) / 4  # norm 4: retrieval is sharp at β=1
            registry.store_patterns(name, patterns, None)
    registry.store.close()


def queries_for(name: str, n: int = 256) -> np.ndarray:
    rng = np.random.default_rng(1)
    q = rng.standard_normal((n, BANKS[name]["dim"])).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True) * 4


async def run_rest(server: ServerProcess, bank: str, queries: np.ndarray, clients: int, seconds: float) -> dict:
    bodies = [json.dumps({"queries": [q.tolist()], "steps": STEPS}).encode() for q in queries]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as client:
        async def call(i: int) -> None:
            r = await client.post(f"/v1/banks/{bank}/retrieve", content=bodies[i % len(bodies)],
                                  headers={"content-type": "application/json"})
            r.raise_for_status()
        return await drive(call, clients, seconds)


async def run_grpc(server: ServerProcess, bank: str, queries: np.ndarray, clients: int, seconds: float) -> dict:
    requests = [pb.RetrieveRequest(bank=bank, queries=[pb.Vector(values=q.tolist())], steps=STEPS) for q in queries]
    async with grpc.aio.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.AmserveStub(channel)

        async def call(i: int) -> None:
            await stub.Retrieve(requests[i % len(requests)])
        return await drive(call, clients, seconds)


def run_raw(registry: BankRegistry, bank: str, queries: np.ndarray, batch: int, seconds: float,
            in_engine_thread: bool = True) -> dict:
    """The engine alone, in-process, at a given batch size: queries per second. From a worker thread as
    the server calls it, unless `in_engine_thread` is false (then from the calling thread)."""
    if in_engine_thread:
        return ENGINE_THREAD.submit(run_raw, registry, bank, queries, batch, seconds, False).result()
    parts = [registry.check_queries(bank, queries[i:i + 1], None) for i in range(batch)]
    options = DynamicsOptions(steps=STEPS)
    registry.run_batch(bank, parts, options)  # warm-up
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        registry.run_batch(bank, parts, options)
        calls += 1
    elapsed = time.perf_counter() - start
    return {"batch": batch, "throughput_qps": calls * batch / elapsed, "ms_per_call": 1e3 * elapsed / calls}


def wrk_body(query: np.ndarray, encoding_format: str) -> dict:
    if encoding_format == "base64":
        return {"queries": [base64.b64encode(query.astype("<f4").tobytes()).decode()], "steps": STEPS,
                "encoding_format": "base64"}
    return {"queries": [query.tolist()], "steps": STEPS}


def run_wrk(server: ServerProcess, bank: str, encoding_format: str, seconds: float, work: Path) -> dict:
    """wrk at 64 connections: requests/s, and the rows per engine call the server formed meanwhile."""
    script = work / f"retrieve-{bank}-{encoding_format}.lua"
    script.write_text(WRK_SCRIPT.format(body=json.dumps(wrk_body(queries_for(bank)[7], encoding_format))))
    url = f"{server.url}/v1/banks/{bank}/retrieve"
    wrk_result(wrk(url, WRK_CONNECTIONS, 1, script))  # warm-up
    before = batch_rows(httpx.get(f"{server.url}/metrics").text, "associative_memory")
    cell = wrk_result(wrk(url, WRK_CONNECTIONS, seconds, script))
    after = batch_rows(httpx.get(f"{server.url}/metrics").text, "associative_memory")
    calls = after[1] - before[1]
    return {**cell, "mean_batch_rows": (after[0] - before[0]) / calls if calls else None}


def formed_batch(mean_batch_rows: float | None) -> int:
    """The batch size the engine alone runs for a wrk run that formed batches of `mean_batch_rows`."""
    return max(1, round(mean_batch_rows or 1))


def first_thread_qps(data_dir: Path, bank: str, batch: int, seconds: float, rounds: int) -> float:
    """The engine alone from a fresh process's first thread, no other thread having run a team in it:
    run in a process of its own (`first_thread_engine`)."""
    tune_process()
    registry = BankRegistry(SQLiteStore(data_dir))
    return statistics.median(run_raw(registry, bank, queries_for(bank), batch, seconds, in_engine_thread=False)
                             ["throughput_qps"] for _ in range(rounds))


def first_thread_engine(data_dir: Path, bank: str, batch: int, seconds: float, rounds: int) -> float:
    # OpenMP's default wait there: the servers' short spin (inherited) would stop the spinning this shows.
    servers_wait = {name: os.environ.pop(name) for name in OPENMP_WAIT if name in os.environ}
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as process:
            return process.submit(first_thread_qps, data_dir, bank, batch, seconds, rounds).result()
    finally:
        os.environ.update(servers_wait)


def wrk_cells(work: Path, bank_names: list[str], backends: list[str], registry: BankRegistry, seconds: float,
              rounds: int) -> list:
    """Each cell `rounds` times in turn (a round of every cell, then the next), each wrk run followed at
    once by the engine alone at the batch size it formed (the server idle meanwhile), so that a round's
    ratio has both figures from the same minute of this shared machine: the medians, and each round's."""
    runs: dict[tuple, list[dict]] = {}
    for _ in range(rounds):
        for backend in backends:
            extra = ["--max-batch-size", "64", "--max-queue-size", "4096", "--max-in-flight", "4096", "--model", "none"]
            with ServerProcess(work / "data", backend=backend, extra_args=extra) as server:
                for bank in bank_names:
                    for encoding_format in ("float", "base64"):
                        cell = run_wrk(server, bank, encoding_format, seconds, work)
                        cell["engine_qps"] = run_raw(registry, bank, queries_for(bank),
                                                     formed_batch(cell["mean_batch_rows"]), seconds)["throughput_qps"]
                        runs.setdefault((bank, backend, encoding_format), []).append(cell)
    cells = []
    for (bank, backend, encoding_format), measured in runs.items():
        batches = [c["mean_batch_rows"] for c in measured if c["mean_batch_rows"]]
        p50s = [c["p50_ms"] for c in measured if c["p50_ms"] is not None]  # None when wrk printed no percentile
        ratios = [c["rps"] / c["engine_qps"] for c in measured]
        cells.append({"rps": statistics.median(c["rps"] for c in measured),
                      "p50_ms": statistics.median(p50s) if p50s else None,
                      "non_2xx": sum(c["non_2xx"] for c in measured),
                      "mean_batch_rows": statistics.median(batches) if batches else None,
                      "engine_qps": statistics.median(c["engine_qps"] for c in measured),
                      "rest_over_engine": statistics.median(ratios),
                      "rounds_rps": [c["rps"] for c in measured],
                      "rounds_engine_qps": [c["engine_qps"] for c in measured],
                      "rounds_rest_over_engine": ratios,
                      "bank": bank, "backend": backend, "encoding_format": encoding_format})
    # The first-thread figure, once per bank and batch size (cells that did the same work share it).
    main_thread: dict[tuple, float] = {}
    for cell in cells:
        work_item = (cell["bank"], formed_batch(cell["mean_batch_rows"]))
        if work_item not in main_thread:
            main_thread[work_item] = first_thread_engine(work / "data", *work_item, seconds, rounds)
        cell.update(engine_qps_main_thread=main_thread[work_item],
                    rest_over_engine_main_thread=cell["rps"] / main_thread[work_item])
        print(f"wrk {cell['bank']:6} {cell['backend']:8} {cell['encoding_format']:6} {cell['rps']:8.1f} req/s "
              f"batch≈{work_item[1]:3}  engine {cell['engine_qps']:8.1f} q/s "
              f"(first thread {main_thread[work_item]:8.1f})  "
              f"ratio {cell['rest_over_engine']:.2f} ({cell['rest_over_engine_main_thread']:.2f})  "
              f"rounds {' '.join(f'{r:.2f}' for r in cell['rounds_rest_over_engine'])}", flush=True)
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per cell")
    parser.add_argument("--clients", default="1,8,64")
    parser.add_argument("--banks", default="small,large,drdam")
    parser.add_argument("--backends", default="embedded,triton", help="triton adds REST/gRPC via Triton")
    parser.add_argument("--only", choices=["wrk"], help="only the wrk runs (and the engine alone beside them)")
    parser.add_argument("--rounds", type=int, default=3, help="wrk rounds per cell (medians are reported)")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest/results/retrieve.json")
    args = parser.parse_args()
    tune_process()  # the servers' malloc settings here too (they also reach the servers this starts)
    clients_list = [int(c) for c in args.clients.split(",")]
    bank_names = args.banks.split(",")

    work = Path(tempfile.mkdtemp(prefix="amserve-bench-"))
    print(f"building banks {bank_names} in {work} ...", flush=True)
    wrk_banks = list(dict.fromkeys([b for b in bank_names if b != "drdam"] + ["tiny"]))
    build_banks(work / "data", list(dict.fromkeys(bank_names + wrk_banks)))
    registry = BankRegistry(SQLiteStore(work / "data"))  # for the raw-engine runs (read-only use)
    results: dict = {"machine": {"cpu_count": torch.get_num_threads(), "platform": platform.platform(),
                                 "torch": torch.__version__}, "steps": STEPS, "seconds": args.seconds, "cells": []}

    backends = args.backends.split(",")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is missing: apt-get install wrk (make bench installs it)")
    wrk_results = {**results, "connections": WRK_CONNECTIONS,
                   "rounds": args.rounds,
                   "cells": wrk_cells(work, wrk_banks, backends, registry, args.seconds, args.rounds)}
    write_results(args.out.with_name("retrieve_wrk.json"), wrk_results)
    if args.only == "wrk":
        return 0

    setups = [("embedded", "on", ["--max-batch-size", "64"]), ("embedded", "off", ["--max-batch-size", "1"])]
    if "triton" in backends:
        setups.append(("triton", "on", []))  # Triton's batcher: the knobs in model_repository/*/config.pbtxt
    for backend, batching, batch_args in setups:
        extra = batch_args + ["--max-queue-size", "4096", "--max-in-flight", "4096", "--model", "none"]
        with ServerProcess(work / "data", backend=backend, extra_args=extra) as server:
            for bank in bank_names:
                queries = queries_for(bank)
                for transport, runner in (("rest", run_rest), ("grpc", run_grpc)):
                    for clients in clients_list:
                        before = batch_rows(httpx.get(f"{server.url}/metrics").text, "associative_memory")
                        cell = asyncio.run(runner(server, bank, queries, clients, args.seconds))
                        after = batch_rows(httpx.get(f"{server.url}/metrics").text, "associative_memory")
                        calls = after[1] - before[1]
                        cell.update(bank=bank, backend=backend, transport=transport, batching=batching,
                                    clients=clients, mean_batch_rows=(after[0] - before[0]) / calls if calls else None)
                        results["cells"].append(cell)
                        print(f"{bank:6} {backend:8} {transport:4} batching={batching:3} clients={clients:3} "
                              f"{cell['throughput_rps']:8.1f} req/s  p50 {cell['p50_ms']:7.2f} ms  "
                              f"p99 {cell['p99_ms']:7.2f} ms  batch≈{cell['mean_batch_rows'] or 0:5.1f}  "
                              f"errors {cell['errors']}", flush=True)

    # Raw engine at the batch sizes the batcher formed (REST, batching on), measured in the same run.
    raw: dict = {}
    for bank in bank_names:
        queries = queries_for(bank)
        for clients in clients_list:
            cell = next(c for c in results["cells"] if (c["bank"], c["backend"], c["transport"], c["batching"],
                                                        c["clients"]) == (bank, "embedded", "rest", "on", clients))
            batch = max(1, round(cell["mean_batch_rows"] or 1))
            raw[f"{bank}/{clients}"] = run_raw(registry, bank, queries, batch, args.seconds)
            print(f"{bank:6} raw engine batch={batch:3} {raw[f'{bank}/{clients}']['throughput_qps']:8.1f} q/s", flush=True)
    results["raw_engine"] = raw

    def rate(bank: str, transport: str, batching: str, clients: int, backend: str = "embedded") -> float:
        return next(c["throughput_rps"] for c in results["cells"] if (c["bank"], c["backend"], c["transport"],
                    c["batching"], c["clients"]) == (bank, backend, transport, batching, clients))

    top = max(clients_list)
    ratios = {}
    for bank in bank_names:
        raw_top = raw[f"{bank}/{top}"]["throughput_qps"]
        ratios[bank] = {
            f"batching_on_over_off_rest_{top}": rate(bank, "rest", "on", top) / rate(bank, "rest", "off", top),
            f"batching_on_over_off_grpc_{top}": rate(bank, "grpc", "on", top) / rate(bank, "grpc", "off", top),
            f"rest_over_raw_{top}": rate(bank, "rest", "on", top) / raw_top,
            f"grpc_over_raw_{top}": rate(bank, "grpc", "on", top) / raw_top,
        }
        if any(c["backend"] == "triton" for c in results["cells"]):
            ratios[bank][f"triton_rest_over_raw_{top}"] = rate(bank, "rest", "on", top, "triton") / raw_top
            ratios[bank][f"triton_rest_over_embedded_rest_{top}"] = (rate(bank, "rest", "on", top, "triton")
                                                                      / rate(bank, "rest", "on", top))
    results["ratios"] = ratios
    results["targets_large_bank"] = {"batching_on_over_off": ">= 5", "rest_over_raw": ">= 0.85",
                                     "grpc_over_raw": ">= 0.90", "triton_rest_over_raw": ">= 0.75"}
    print(json.dumps(ratios, indent=2))
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
