"""Overload run: offer 4× the sustainable retrieve rate and check the service degrades gracefully.

1. Measure the sustainable rate: closed-loop clients on a `modern` bank for a few seconds.
2. Offer `--factor` × that rate open-loop (arrivals on a fixed schedule, not waiting for answers).
3. Report: admitted requests' p50/p99 latency, the share refused with 503/429 + Retry-After, any other
   status (must be none), the server's resident memory before/peak (must stay bounded), and whether
   the server is still healthy afterwards. Writes loadtest/results/overload.json; exits 1 if a check fails.

    python loadtest/overload.py [--seconds 10] [--factor 4] [--max-queue-size 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loadtest.common import write_results  # noqa: E402
from tests.harness import ServerProcess  # noqa: E402

JSON = {"content-type": "application/json"}
DIM, PATTERNS = 256, 50_000  # heavy enough per request that the load generator is not the bottleneck


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float | None:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else None


async def sustainable_rate(client: aiohttp.ClientSession, url: str, body: bytes, seconds: float,
                           clients: int = 16) -> float:
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            async with client.post(url, data=body, headers=JSON) as r:
                await r.read()
                done += r.status == 200

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return done / (time.perf_counter() - started)


async def offer(client: aiohttp.ClientSession, url: str, body: bytes, rate: float, seconds: float, pid: int) -> dict:
    statuses: dict[int, int] = {}
    admitted: list[float] = []
    missing_retry_after = 0
    memory = [rss_mb(pid)]

    async def one() -> None:
        nonlocal missing_retry_after
        started = time.perf_counter()
        try:
            async with client.post(url, data=body, headers=JSON) as r:
                await r.read()
                status, headers = r.status, r.headers
        except aiohttp.ClientError:
            statuses[-1] = statuses.get(-1, 0) + 1  # connection-level failure: counted against the service
            return
        statuses[status] = statuses.get(status, 0) + 1
        if status == 200:
            admitted.append(time.perf_counter() - started)
        elif status in (429, 503) and "Retry-After" not in headers:
            missing_retry_after += 1

    tasks = []
    start = time.perf_counter()
    total = int(rate * seconds)
    for i in range(total):  # fixed arrival schedule: the offered load does not slow down when answers do
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
        if i % max(1, int(rate / 4)) == 0:
            memory.append(rss_mb(pid))
    await asyncio.gather(*tasks)
    memory.append(rss_mb(pid))
    return {
        "offered": total, "offered_rate": rate, "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "admitted": len(admitted), "admitted_p50_ms": 1e3 * statistics.median(admitted) if admitted else None,
        "admitted_p99_ms": 1e3 * percentile(admitted, 0.99) if admitted else None,
        "refused_without_retry_after": missing_retry_after,
        "rss_mb_start": memory[0], "rss_mb_peak": max(memory),
    }


async def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="amserve-overload-"))
    server = ServerProcess(work / "data", extra_args=[
        "--model", "none", "--max-queue-size", str(args.max_queue_size), "--max-batch-size", "32",
        "--max-in-flight", str(args.max_in_flight)]).start()
    try:
        rng = np.random.default_rng(0)
        with httpx.Client(base_url=server.url, timeout=120) as setup:
            setup.put("/v1/banks/load", json={"kind": "modern", "dim": DIM}).raise_for_status()
            for _ in range(PATTERNS // 5000):
                setup.post("/v1/banks/load/store", json={"patterns": rng.standard_normal((5000, DIM)).tolist()}
                           ).raise_for_status()
        body = json.dumps({"queries": [rng.standard_normal(DIM).tolist()], "steps": 3}).encode()
        url = f"{server.url}/v1/banks/load/retrieve"
        connector = aiohttp.TCPConnector(limit=1000)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as client:
            rate = await sustainable_rate(client, url, body, args.calibrate_seconds)
            result = await offer(client, url, body, args.factor * rate, args.seconds, server.proc.pid)
        healthy = httpx.get(f"{server.url}/healthz/ready").status_code == 200
        result.update(sustainable_rps=rate, factor=args.factor, max_queue_size=args.max_queue_size,
                      max_in_flight=args.max_in_flight,
                      healthy_after=healthy, alive_after=server.proc.poll() is None, load_average=os.getloadavg())
        return result
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the overload is offered")
    parser.add_argument("--calibrate-seconds", type=float, default=5.0)
    parser.add_argument("--factor", type=float, default=4.0)
    parser.add_argument("--max-queue-size", type=int, default=64)
    parser.add_argument("--max-in-flight", type=int, default=64)
    parser.add_argument("--max-p99-ms", type=float, default=5000.0, help="bound on admitted requests' p99")
    parser.add_argument("--max-rss-growth-mb", type=float, default=500.0)
    parser.add_argument("--out", type=Path, default=ROOT / "loadtest/results/overload.json")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    unexpected = {k: v for k, v in result["statuses"].items() if k not in ("200", "503", "429")}
    checks = {
        "only 200/503/429 answers": not unexpected,
        "some requests refused (the overload was real)": result["admitted"] < result["offered"],
        "every refusal carries Retry-After": result["refused_without_retry_after"] == 0,
        f"admitted p99 <= {args.max_p99_ms} ms": (result["admitted_p99_ms"] or 0) <= args.max_p99_ms,
        f"memory growth <= {args.max_rss_growth_mb} MB": result["rss_mb_peak"] - result["rss_mb_start"] <= args.max_rss_growth_mb,
        "server alive and ready afterwards": result["alive_after"] and result["healthy_after"],
    }
    result["checks"] = checks
    print(json.dumps(result, indent=2))
    write_results(args.out, result)
    failed = [name for name, ok in checks.items() if not ok]
    print("FAILED: " + "; ".join(failed) if failed else "all overload checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
