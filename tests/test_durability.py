"""Acknowledged stores survive SIGKILL: real server process, concurrent writers, kill mid-load, restart."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import numpy as np

from tests.harness import ServerProcess


def test_acknowledged_stores_survive_sigkill(tmp_path):
    data = tmp_path / "data"
    dim = 32
    acknowledged: list[tuple[list[str], list[list[float]]]] = []
    lock = threading.Lock()
    stop = threading.Event()

    server = ServerProcess(data).start()
    httpx.put(f"{server.url}/v1/banks/crash", json={"kind": "modern", "dim": dim, "params": {"beta": 50.0}}).raise_for_status()

    def writer(worker: int) -> None:
        rng = np.random.default_rng(worker)
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for batch in range(10_000):
                if stop.is_set():
                    return
                ids = [f"w{worker}-{batch}-{k}" for k in range(4)]
                vectors = rng.standard_normal((4, dim)).astype(np.float32).tolist()
                try:
                    r = client.post("/v1/banks/crash/store", json={"patterns": vectors, "ids": ids})
                except httpx.HTTPError:
                    return  # the server is gone: this store was never acknowledged
                if r.status_code == 200:
                    with lock:
                        acknowledged.append((ids, vectors))

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acknowledged) < 60 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.kill(signal.SIGKILL) == -signal.SIGKILL  # mid-load: writers are still sending
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert len(acknowledged) >= 60

    with ServerProcess(data) as restarted, httpx.Client(base_url=restarted.url, timeout=30) as client:
        count = client.get("/v1/banks/crash").json()["count"]
        acked_ids = [pid for ids, _ in acknowledged for pid in ids]
        assert count >= len(acked_ids)
        for ids, vectors in acknowledged:
            # Same id and same vector is an idempotent no-op; a missing or altered pattern would add or 409.
            r = client.post("/v1/banks/crash/store", json={"patterns": vectors, "ids": ids})
            assert r.status_code == 200, r.text
            assert r.json()["count"] == count
        ids, vectors = acknowledged[len(acknowledged) // 2]
        result = client.post("/v1/banks/crash/retrieve", json={"queries": vectors[:1]}).json()["results"][0]
        assert result["nearest"]["id"] == ids[0]
        np.testing.assert_allclose(result["state"], vectors[0], atol=1e-4)
