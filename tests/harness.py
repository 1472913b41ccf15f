"""`amserve serve` as a real child process on loopback: used by the test suite, crash tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]  # the checkout: tests and benchmarks run from it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`amserve serve` as a child process, started and killed like in production."""

    def __init__(self, data_dir: Path, *, backend: str = "embedded", extra_args: list[str] | None = None,
                 env: dict | None = None, log_dir: Path | None = None):
        self.data_dir = data_dir
        self.backend = backend
        self.extra_args = extra_args or []
        self.env = {**os.environ, **(env or {})}
        self.rest_port = free_port()
        self.grpc_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = (log_dir or data_dir.parent) / f"server-{self.rest_port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 120.0) -> "ServerProcess":
        cmd = [sys.executable, "-m", "service.cli", "serve", "--backend", self.backend,
               "--data-dir", str(self.data_dir), "--rest-port", str(self.rest_port),
               "--grpc-port", str(self.grpc_port), *self.extra_args]
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)
        self.log.close()
        return code

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill(signal.SIGTERM)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
