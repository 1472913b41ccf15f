"""Acknowledged stores survive SIGKILL: real server process, concurrent writers, kill mid-load, restart."""

from __future__ import annotations

import signal

import httpx
import numpy as np

from tests.faults.writers import Writers
from tests.harness import ServerProcess
from tests.helpers import wait_until


def test_acknowledged_stores_survive_sigkill(tmp_path):
    data = tmp_path / "data"
    dim = 32
    server = ServerProcess(data).start()
    try:
        httpx.put(f"{server.url}/v1/banks/crash", json={"kind": "modern", "dim": dim, "params": {"beta": 50.0}}
                  ).raise_for_status()
        with Writers(server.url, "crash", dim, clients=6, batch=4, timeout=10) as writers:
            wait_until(lambda: len(writers.acknowledged) >= 60, timeout=60, interval=0.05)
            assert server.kill(signal.SIGKILL) == -signal.SIGKILL  # mid-load: writers are still sending
    finally:
        server.stop()
    acknowledged = writers.acknowledged
    assert len(acknowledged) >= 60

    with ServerProcess(data) as restarted, httpx.Client(base_url=restarted.url, timeout=30) as client:
        count = client.get("/v1/banks/crash").json()["count"]
        assert count >= len(writers.acknowledged_ids)
        for ids, vectors in acknowledged:
            # Same id and same vector is an idempotent no-op; a missing or altered pattern would add or 409.
            r = client.post("/v1/banks/crash/store", json={"patterns": vectors, "ids": ids})
            assert r.status_code == 200, r.text
            assert r.json()["count"] == count
        ids, vectors = acknowledged[len(acknowledged) // 2]
        result = client.post("/v1/banks/crash/retrieve", json={"queries": vectors[:1]}).json()["results"][0]
        assert result["nearest"]["id"] == ids[0]
        np.testing.assert_allclose(result["state"], vectors[0], atol=1e-4)
