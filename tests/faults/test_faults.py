"""Faults with real processes: SIGTERM drains in-flight work; a full or read-only data disk answers a
clear 503 without corrupting what was acknowledged."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.harness import ServerProcess

NO_LM = ["--model", "none"]


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` at `path` (a real ENOSPC when full); skips where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_sigterm_drains_in_flight_requests_then_exits(tmp_path):
    server = ServerProcess(tmp_path / "data", extra_args=NO_LM).start()
    try:
        rng = np.random.default_rng(0)
        with httpx.Client(base_url=server.url, timeout=60) as c:
            c.put("/v1/banks/slow", json={"kind": "rbf", "dim": 64, "params": {"beta": 0.01}}).raise_for_status()
            c.post("/v1/banks/slow/store", json={"patterns": rng.standard_normal((2000, 64)).tolist()}).raise_for_status()
        slow = {"queries": [[0.1] * 64], "steps": 400, "tolerance": 1e-12}
        outcomes: list[int] = []

        def in_flight() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as c:
                outcomes.append(c.post("/v1/banks/slow/retrieve", json=slow).status_code)

        threads = [threading.Thread(target=in_flight) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.5)  # the requests are being served
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.HTTPError):  # no new connections once draining
            httpx.post(f"{server.url}/v1/banks/slow/retrieve", json=slow, timeout=5).raise_for_status()
        for t in threads:
            t.join(timeout=60)
        code = server.proc.wait(timeout=40)
        assert outcomes == [200, 200, 200], outcomes  # admitted work finished
        assert code == 0 and time.monotonic() - started < 35
    finally:
        server.stop()


def _store_until_refused(server: ServerProcess, limit: int = 3000) -> tuple[list[tuple[str, list[float]]], httpx.Response]:
    acknowledged = []
    rng = np.random.default_rng(1)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for i in range(limit):
            vector = rng.standard_normal(64).astype(np.float32).tolist()
            r = c.post("/v1/banks/b/store", json={"patterns": [vector], "ids": [f"p{i}"]})
            if r.status_code != 200:
                return acknowledged, r
            acknowledged.append((f"p{i}", vector))
    raise AssertionError(f"the disk never filled after {limit} stores")


def _check_intact(data_dir: Path, acknowledged: list[tuple[str, list[float]]]) -> None:
    with sqlite3.connect(data_dir / "banks.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    with ServerProcess(data_dir, extra_args=NO_LM) as again, httpx.Client(base_url=again.url, timeout=30) as c:
        assert c.get("/v1/banks/b").json()["count"] == len(acknowledged)
        for pid, vector in acknowledged[::25]:  # same id, same vector: a no-op, else 409 or a new row
            r = c.post("/v1/banks/b/store", json={"patterns": [vector], "ids": [pid]})
            assert r.status_code == 200 and r.json()["count"] == len(acknowledged)


def test_full_disk_is_a_clear_503_and_corrupts_nothing(tmp_path):
    with small_disk(tmp_path / "disk", "512k") as disk:
        server = ServerProcess(disk / "data", extra_args=NO_LM).start()
        try:
            httpx.put(f"{server.url}/v1/banks/b", json={"kind": "modern", "dim": 64}).raise_for_status()
            acknowledged, refused = _store_until_refused(server)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "unavailable"
            assert "storage" in refused.json()["error"]["message"]
            # reads keep working and serving state holds exactly the acknowledged patterns
            assert httpx.get(f"{server.url}/v1/banks/b").json()["count"] == len(acknowledged)
            r = httpx.post(f"{server.url}/v1/banks/b/retrieve", json={"queries": [acknowledged[0][1]]})
            assert r.status_code == 200 and r.json()["results"][0]["nearest"]["id"] == "p0"
        finally:
            server.stop()
        copy = tmp_path / "copy"
        subprocess.run(["cp", "-r", str(disk / "data"), str(copy)], check=True)
    assert len(acknowledged) > 10
    _check_intact(copy, acknowledged)


def test_read_only_data_dir_serves_reads_and_refuses_writes_with_503(tmp_path):
    with ServerProcess(tmp_path / "data", extra_args=NO_LM) as first:
        httpx.put(f"{first.url}/v1/banks/b", json={"kind": "modern", "dim": 4}).raise_for_status()
        httpx.post(f"{first.url}/v1/banks/b/store", json={"patterns": [[1, 0, 0, 0]], "ids": ["kept"]}).raise_for_status()
    with small_disk(tmp_path / "disk", "4m") as disk:
        subprocess.run(["cp", "-r", str(tmp_path / "data"), str(disk / "data")], check=True)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        with ServerProcess(disk / "data", extra_args=NO_LM, log_dir=tmp_path) as server:
            assert httpx.get(f"{server.url}/v1/banks/b").json()["count"] == 1
            r = httpx.post(f"{server.url}/v1/banks/b/retrieve", json={"queries": [[0.9, 0.1, 0, 0]]})
            assert r.json()["results"][0]["nearest"]["id"] == "kept"
            for refused in (
                httpx.post(f"{server.url}/v1/banks/b/store", json={"patterns": [[0, 1, 0, 0]], "ids": ["lost"]}),
                httpx.put(f"{server.url}/v1/banks/c", json={"kind": "modern", "dim": 4}),
                httpx.delete(f"{server.url}/v1/banks/b/patterns/kept"),
            ):
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "unavailable"
            assert httpx.get(f"{server.url}/v1/banks/b").json()["count"] == 1
