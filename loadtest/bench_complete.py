"""Energy Transformer image completion: throughput and latency at 1/8/64 clients, batching on vs off,
over REST (embedded backend), plus the engine alone at the batch sizes the batcher formed.
Writes loadtest/results/complete.json.

    python loadtest/bench_complete.py [--seconds 4] [--clients 1,8,64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.load import drive  # noqa: E402
from service.engines import energy_transformer  # noqa: E402
from loadtest.common import batch_rows, write_results  # noqa: E402
from tests.harness import ServerProcess  # noqa: E402

WEIGHTS = ROOT / "model_repository" / "energy_transformer" / "1"


def requests_bodies(n: int = 64) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    images = (load_digits().images[-n:] / 16.0).astype(np.float32)
    rng = np.random.default_rng(0)
    masks = np.zeros_like(images, dtype=bool)
    for mask in masks:  # half of the 2×2 patches missing
        for patch in rng.choice(16, 8, replace=False):
            r, c = divmod(int(patch), 4)
            mask[2 * r:2 * r + 2, 2 * c:2 * c + 2] = True
    bodies = [json.dumps({"image": i.tolist(), "mask": m.tolist()}).encode() for i, m in zip(images, masks)]
    return images, masks, bodies


def engine_rate(model, images: np.ndarray, masks: np.ndarray, batch: int, seconds: float) -> float:
    x, m = torch.from_numpy(images[:batch]), torch.from_numpy(masks[:batch])
    model.complete(x, m)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model.complete(x, m)
        calls += 1
    return calls * batch / (time.perf_counter() - start)


async def run_rest(server: ServerProcess, bodies: list[bytes], clients: int, seconds: float) -> dict:
    async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                 limits=httpx.Limits(max_connections=clients)) as client:
        async def call(i: int) -> None:
            r = await client.post("/v1/complete", content=bodies[i % len(bodies)],
                                  headers={"content-type": "application/json"})
            r.raise_for_status()
        return await drive(call, clients, seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", default="1,8,64")
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest/results/complete.json")
    args = parser.parse_args()
    clients_list = [int(c) for c in args.clients.split(",")]
    images, masks, bodies = requests_bodies()
    work = Path(tempfile.mkdtemp(prefix="amserve-bench-complete-"))
    results: dict = {"seconds": args.seconds, "load_average_start": os.getloadavg(), "cells": [], "engine": {}}
    for batching, max_batch in (("on", "64"), ("off", "1")):
        extra = ["--model", "none", "--max-batch-size", max_batch, "--max-in-flight", "4096", "--max-queue-size", "4096"]
        with ServerProcess(work / f"data-{batching}", extra_args=extra) as server:
            for clients in clients_list:
                before = batch_rows(httpx.get(f"{server.url}/metrics").text, "energy_transformer")
                cell = asyncio.run(run_rest(server, bodies, clients, args.seconds))
                after = batch_rows(httpx.get(f"{server.url}/metrics").text, "energy_transformer")
                calls = after[1] - before[1]
                cell.update(batching=batching, clients=clients,
                            mean_batch=(after[0] - before[0]) / calls if calls else None)
                results["cells"].append(cell)
                print(f"batching={batching:3} clients={clients:3} {cell['throughput_rps']:8.1f} img/s  "
                      f"p50 {cell['p50_ms']:7.1f} ms  p99 {cell['p99_ms']:7.1f} ms  batch≈{cell['mean_batch'] or 0:5.1f}  "
                      f"errors {cell['errors']}", flush=True)
    model = energy_transformer.load(WEIGHTS)
    for cell in results["cells"]:
        if cell["batching"] == "on":
            batch = max(1, round(cell["mean_batch"] or 1))
            results["engine"][str(cell["clients"])] = {"batch": batch,
                                                       "images_per_s": engine_rate(model, images, masks, batch, args.seconds)}
    top = str(max(clients_list))
    on = next(c for c in results["cells"] if c["batching"] == "on" and str(c["clients"]) == top)
    off = next(c for c in results["cells"] if c["batching"] == "off" and str(c["clients"]) == top)
    results["ratios"] = {f"batching_on_over_off_{top}": on["throughput_rps"] / off["throughput_rps"],
                         f"rest_over_engine_{top}": on["throughput_rps"] / results["engine"][top]["images_per_s"]}
    results["load_average_end"] = os.getloadavg()
    print(json.dumps(results["ratios"], indent=2))
    write_results(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
