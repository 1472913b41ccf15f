"""Concurrent retrieves on one bank are merged into batched engine calls (seen in /metrics)."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np

from tests.helpers import metric_samples


def batch_histogram(metrics_text: str) -> dict[str, float]:
    """Bucket upper bound → cumulative count of amserve_batch_size for the memory model."""
    return {sample.labels["le"]: sample.value
            for sample in metric_samples(metrics_text, "amserve_batch_size_bucket", model="associative_memory")}


def test_concurrent_retrieves_form_batches_larger_than_one(server, bank_name):
    """The gateway's own batcher, on every backend (Triton's batcher is checked in tests/triton)."""
    rng = np.random.default_rng(5)
    patterns = rng.standard_normal((2000, 128)).astype(np.float32)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        c.put(f"/v1/banks/{bank_name}", json={"kind": "modern", "dim": 128, "params": {"beta": 1.0}})
        c.post(f"/v1/banks/{bank_name}/store", json={"patterns": patterns.tolist()})
        before = batch_histogram(c.get("/metrics").text)

    queries = patterns[:64] + 0.05 * rng.standard_normal((64, 128)).astype(np.float32)

    async def load() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(*(
                c.post(f"/v1/banks/{bank_name}/retrieve", json={"queries": [q.tolist()], "steps": 20})
                for q in queries))

    responses = asyncio.run(load())
    assert all(r.status_code == 200 for r in responses)
    # Each answer is its own query's answer, not a neighbour's from the same batch.
    for i, r in enumerate(responses):
        state = np.array(r.json()["results"][0]["state"])
        assert np.argmax(patterns @ state) == np.argmax(patterns @ queries[i])

    after = batch_histogram(httpx.get(f"{server.url}/metrics").text)
    calls = after["+Inf"] - before.get("+Inf", 0)
    single = after["1.0"] - before.get("1.0", 0)
    assert calls < 64, "every request ran alone"
    assert calls - single >= 1, "no engine call merged more than one request"
