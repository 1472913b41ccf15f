"""Triton dies under load: the gateway answers 503 (no hang, no 500) and reports unready; Triton comes
back on the same data: the gateway recovers by itself and every acknowledged store is there."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import numpy as np

from tests.harness import ServerProcess
from service.triton.launcher import TritonServer
from tests.triton.fixtures import launch


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def ready(gateway: ServerProcess) -> int:
    return httpx.get(f"{gateway.url}/healthz/ready", timeout=5).status_code


def test_gateway_survives_triton_being_killed_and_restarted(tmp_path):
    triton = launch(tmp_path / "triton")
    gateway = ServerProcess(tmp_path / "gateway", backend="triton", extra_args=["--triton-url", triton.url]).start()
    acknowledged: list[tuple[str, list[float]]] = []
    statuses: list[int] = []
    stop = threading.Event()
    try:
        httpx.put(f"{gateway.url}/v1/banks/load", json={"kind": "modern", "dim": 16}).raise_for_status()

        def writer(worker: int) -> None:
            rng = np.random.default_rng(worker)
            with httpx.Client(base_url=gateway.url, timeout=15) as client:
                for i in range(100_000):
                    if stop.is_set():
                        return
                    pid, vector = f"w{worker}-{i}", rng.standard_normal(16).astype(np.float32).tolist()
                    r = client.post("/v1/banks/load/store", json={"patterns": [vector], "ids": [pid]})
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        acknowledged.append((pid, vector))
                    else:
                        time.sleep(0.05)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        assert wait_for(lambda: len(acknowledged) >= 40, timeout=60)
        os.kill(triton.pid, signal.SIGKILL)
        killed_at = len(statuses)
        assert wait_for(lambda: ready(gateway) == 503, timeout=15)
        assert wait_for(lambda: len(statuses) > killed_at + 8, timeout=30)  # requests keep getting answers
        during = statuses[killed_at:]
        assert 503 in during and 500 not in during, sorted(set(during))

        restarted = TritonServer(triton.model_repository, http_port=triton.http_port, grpc_port=triton.grpc_port,
                                 metrics_port=triton.metrics_port, data_dir=tmp_path / "triton" / "data").start()
        try:
            assert wait_for(lambda: ready(gateway) == 200, timeout=60)
            before = len(acknowledged)
            assert wait_for(lambda: len(acknowledged) > before + 10, timeout=60)  # stores succeed again
            stop.set()
            for t in threads:
                t.join(timeout=30)
            assert set(statuses) <= {200, 503}, sorted(set(statuses))
            with httpx.Client(base_url=gateway.url, timeout=30) as client:
                count = client.get("/v1/banks/load").json()["count"]
                assert count >= len(acknowledged)  # a store cut off by the kill may have committed unacknowledged
                for pid, vector in acknowledged[::10]:
                    r = client.post("/v1/banks/load/store", json={"patterns": [vector], "ids": [pid]})
                    assert r.status_code == 200 and r.json()["count"] == count
        finally:
            restarted.stop()
    finally:
        stop.set()
        gateway.stop()
        triton.stop()
