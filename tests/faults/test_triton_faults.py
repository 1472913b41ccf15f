"""Triton dies under load: the gateway answers 503 (no hang, no 500) and reports unready; Triton comes
back on the same data: the gateway recovers by itself and every acknowledged store is there."""

from __future__ import annotations

import os
import signal

import httpx

from service.triton.launcher import TritonServer, group_members
from tests.faults.writers import Writers
from tests.harness import ServerProcess
from tests.helpers import wait_until
from tests.triton.fixtures import launch


def ready(gateway: ServerProcess) -> int:
    return httpx.get(f"{gateway.url}/healthz/ready", timeout=5).status_code


def test_gateway_survives_triton_being_killed_and_restarted(tmp_path):
    triton = launch(tmp_path / "triton")
    gateway = ServerProcess(tmp_path / "gateway", backend="triton", extra_args=["--triton-url", triton.url]).start()
    restarted = TritonServer(triton.model_repository, http_port=triton.http_port, grpc_port=triton.grpc_port,
                             metrics_port=triton.metrics_port, data_dir=tmp_path / "triton" / "data")
    try:
        httpx.put(f"{gateway.url}/v1/banks/load", json={"kind": "modern", "dim": 16}).raise_for_status()
        with Writers(gateway.url, "load", 16, clients=4) as writers:
            assert wait_until(lambda: len(writers.acknowledged) >= 40, timeout=60)
            group = triton.pid
            os.kill(triton.pid, signal.SIGKILL)
            killed_at = len(writers.statuses)
            assert wait_until(lambda: ready(gateway) == 503, timeout=15)
            assert wait_until(lambda: len(writers.statuses) > killed_at + 8, timeout=30)  # answers keep coming
            during = writers.statuses[killed_at:]
            assert 503 in during and 500 not in during, sorted(set(during))
            triton.stop()  # what is left of the crashed Triton: its Python stubs
            assert not group_members(group)

            restarted.start()
            assert wait_until(lambda: ready(gateway) == 200, timeout=60)
            before = len(writers.acknowledged)
            assert wait_until(lambda: len(writers.acknowledged) > before + 10, timeout=60)  # stores succeed again
        assert set(writers.statuses) <= {200, 503}, sorted(set(writers.statuses))
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            count = client.get("/v1/banks/load").json()["count"]
            assert count >= len(writers.acknowledged_ids)  # a store cut off by the kill may have committed unacknowledged
            for ids, vectors in writers.acknowledged[::10]:
                r = client.post("/v1/banks/load/store", json={"patterns": vectors, "ids": ids})
                assert r.status_code == 200 and r.json()["count"] == count
    finally:
        gateway.stop()
        restarted.stop()
        triton.stop()
