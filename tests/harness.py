"""`amserve serve` as a real child process on loopback: used by the test suite, crash tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx

from service.triton.launcher import end_processes, free_port, terminate_with_parent
from tests.helpers import processes_with_environment, running, wait_until

ROOT = Path(__file__).resolve().parents[1]  # the checkout: tests and benchmarks run from it
# Set to a fresh value in each server's environment, so that the server's descendants (with the triton
# backend: its tritonserver in a session of its own, and Triton's Python stubs) can be found and ended.
SERVER_MARKER = "AMSERVE_TEST_SERVER"
STOP_GRACE_SECONDS = 15.0  # what the gateway's Triton gets to shut down once the gateway is gone


class ServerProcess:
    """`amserve serve` as a child process, started and killed like in production."""

    def __init__(self, data_dir: Path, *, backend: str = "embedded", extra_args: list[str] | None = None,
                 env: dict | None = None, log_dir: Path | None = None):
        self.data_dir = data_dir
        self.backend = backend
        self.extra_args = extra_args or []
        self.marker = uuid.uuid4().hex
        self.env = {**os.environ, **(env or {}), SERVER_MARKER: self.marker}
        self.rest_port = free_port()
        self.grpc_port = free_port()
        self.url = f"http://127.0.0.1:{self.rest_port}"
        self.grpc_target = f"127.0.0.1:{self.grpc_port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = (log_dir or data_dir.parent) / f"server-{self.rest_port}.log"

    def start(self, timeout: float = 120.0) -> "ServerProcess":
        cmd = [sys.executable, "-m", "service.cli", "serve", "--backend", self.backend,
               "--data-dir", str(self.data_dir), "--rest-port", str(self.rest_port),
               "--grpc-port", str(self.grpc_port), *self.extra_args]
        self.log = open(self.log_path, "ab")
        # A session of its own: a Ctrl-C meant for the test run reaches the server only through stop();
        # SIGTERM when the thread that started it ends, so a killed test run or benchmark leaves no server.
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=terminate_with_parent)

        def answers_ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                return httpx.get(f"{self.url}/healthz/ready", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            ready = wait_until(answers_ready, timeout, interval=0.2)
        except RuntimeError:
            self.stop()
            raise
        if not ready:
            self.stop()
            raise TimeoutError(f"server not ready after {timeout}s:\n{self.log_path.read_text()[-3000:]}")
        return self

    def descendants(self) -> dict[int, str]:
        """{pid: command line} of the processes this server started that are still alive."""
        return processes_with_environment(SERVER_MARKER, self.marker)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to the server and wait for it to exit, then end every process it left behind;
        returns the server's exit code."""
        assert self.proc is not None
        # Every process once seen counts until it is gone: one that is exiting (Triton on its
        # parent-death signal, say) may no longer show its environment, and so its marker.
        seen = set(self.descendants())
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=60)

        def members() -> list[int]:
            seen.update(self.descendants())
            return [pid for pid in seen if running(pid)]
        end_processes(members, STOP_GRACE_SECONDS)
        self.log.close()
        return code

    def stop(self) -> None:
        if self.proc is not None:
            self.kill(signal.SIGTERM)  # a server that exited already gets no signal, its leftovers do

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
