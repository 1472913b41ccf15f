"""Closed-loop load generation shared by the benchmarks: N clients, bounded by time."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable


def summarize(latencies: list[float], seconds: float) -> dict:
    ordered = sorted(latencies)
    return {
        "requests": len(ordered),
        "throughput_rps": len(ordered) / seconds,
        "p50_ms": 1e3 * statistics.median(ordered) if ordered else None,
        "p99_ms": 1e3 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None,
    }


async def drive(call: Callable[[int], Awaitable[None]], clients: int, seconds: float, warmup: float = 0.5) -> dict:
    """`clients` workers calling `call(i)` back to back until the clock runs out; requests that start
    after the warm-up are measured."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def worker(w: int) -> None:
        nonlocal errors
        i = w
        while (now := time.perf_counter()) < stop_at:
            try:
                await call(i)
            except Exception:  # noqa: BLE001 - counted and reported
                errors += 1
            if now >= measure_from:
                latencies.append(time.perf_counter() - now)
            i += clients

    await asyncio.gather(*(worker(w) for w in range(clients)))
    return {**summarize(latencies, seconds), "errors": errors}
