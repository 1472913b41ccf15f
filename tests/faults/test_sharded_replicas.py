"""A bank sharded over two Triton replicas, with real processes: the gateway fans every dynamics step out
to the shards and merges; the answers are an unsharded bank's; a shard keeps answering while one of its
replicas lives, and with none the request fails naming the shard."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

from tests.faults.test_triton_replicas import replica
from tests.harness import ServerProcess
from tests.helpers import metric_value
from tests.triton.fixtures import MEMORY_ONLY, export_for_tests

DIM = 8


def batch_sizes(url: str) -> tuple[float, float]:
    """(requests, batches) the gateway's batcher has formed so far."""
    text = httpx.get(f"{url}/metrics").text
    return tuple(metric_value(text, f"amserve_batch_size_{series}", model="associative_memory") or 0.0
                 for series in ("sum", "count"))


def same_answers(client: httpx.Client, body: dict, route: str = "retrieve") -> tuple[dict, dict]:
    whole = client.post(f"/v1/banks/whole/{route}", json=body)
    split = client.post(f"/v1/banks/split/{route}", json=body)
    assert whole.status_code == split.status_code == 200, (whole.text, split.text)
    for expected, got in zip(whole.json()["results"], split.json()["results"]):
        assert got["nearest"]["id"] == expected["nearest"]["id"]
        assert (got["steps"], got["converged"]) == (expected["steps"], expected["converged"])
        np.testing.assert_allclose(got["state"], expected["state"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["trace"], expected["trace"], rtol=1e-5, atol=1e-5)
    return whole.json(), split.json()


def test_a_bank_sharded_over_two_replicas(tmp_path, postgres_dsn):
    repository = export_for_tests(tmp_path / "repository", tmp_path / "data", MEMORY_ONLY)
    first = replica(tmp_path / "r0", repository, postgres_dsn, place="0/2").start()
    second = replica(tmp_path / "r1", repository, postgres_dsn, place="1/2").start()
    gateway = ServerProcess(tmp_path / "gateway", backend="triton", extra_args=[
        "--triton-url", f"{first.url},{second.url}", "--store", postgres_dsn])
    rng = np.random.default_rng(5)
    patterns = rng.standard_normal((60, DIM)).astype(np.float32)
    ids = [f"p{i}" for i in range(60)]
    try:
        gateway.start()
        with httpx.Client(base_url=gateway.url, timeout=60) as client:
            for name, params in (("whole", {"beta": 2.0}), ("split", {"beta": 2.0, "shards": 3})):
                assert client.put(f"/v1/banks/{name}", json={"kind": "modern", "dim": DIM, "params": params}
                                  ).status_code == 201
                stored = client.post(f"/v1/banks/{name}/store", json={"patterns": patterns.tolist(), "ids": ids})
                version = stored.json()["version"]
            # Bank info comes from a replica, which the gateway asks for the version of its own last write.
            info = client.get("/v1/banks/split").json()
            assert info["count"] == 60 and info["version"] == version, info
            assert [shard["shard"] for shard in info["shards"]] == [0, 1, 2]
            assert sum(shard["count"] for shard in info["shards"]) == 60 and min(s["count"] for s in info["shards"]) > 0
            assert [shard["replicas"] for shard in info["shards"]] == [[first.url, second.url], [second.url, first.url],
                                                                       [first.url, second.url]]

            queries = (patterns[[0, 9, 33]] + 0.4 * rng.standard_normal((3, DIM))).astype(np.float32).tolist()
            body = {"queries": queries, "trace": True, "min_version": version}
            same_answers(client, body)
            mask = [[i < 3 for i in range(DIM)]] * 3
            same_answers(client, body | {"mask": mask}, "complete")

            # Concurrent requests on the bank batch in the gateway: one fan-out per step for several.
            before = batch_sizes(gateway.url)
            with ThreadPoolExecutor(16) as pool:
                answers = list(pool.map(lambda _: client.post("/v1/banks/split/retrieve", json=body).status_code,
                                        range(48)))
            assert answers == [200] * 48
            requests, batches = (after - earlier for after, earlier in zip(batch_sizes(gateway.url), before))
            assert requests == 48 and batches < requests, (requests, batches)  # some batches held several

            os.kill(first.pid, signal.SIGKILL)  # every shard still has the second replica
            for _ in range(5):
                same_answers(client, body)

            os.kill(second.pid, signal.SIGKILL)  # now no shard has a live replica
            failed = client.post("/v1/banks/split/retrieve", json=body)
            assert failed.status_code == 503, failed.text
            assert "shard" in failed.json()["error"]["message"]
    finally:
        gateway.stop()
        first.stop()
        second.stop()
