"""No process outlives what started it: a gateway killed with SIGKILL takes its Triton and Triton's
Python stubs along, and the suite-wide check finds a process a test left behind."""

from __future__ import annotations

import os
import signal
import subprocess

from tests.conftest import SESSION_MARKER, leftovers
from tests.harness import ServerProcess
from tests.helpers import processes_with_environment, running, wait_until
from tests.triton.fixtures import MEMORY_ONLY, export_for_tests


def test_a_killed_gateway_leaves_no_triton_and_no_stub(tmp_path):
    repository = export_for_tests(tmp_path / "repository", tmp_path / "data", MEMORY_ONLY)
    server = ServerProcess(tmp_path / "data", backend="triton",
                           extra_args=["--model-repository", str(repository), "--model", "none"]).start()
    try:
        started = server.descendants()
        commands = " ".join(started.values())
        assert "tritonserver" in commands and "triton_python_backend_stub" in commands, started
        assert server.kill(signal.SIGKILL) == -signal.SIGKILL
        # Independent of how the harness found them: none of those pids is a live process any more.
        assert not [pid for pid in started if running(pid)]
    finally:
        server.stop()


def test_the_run_finds_a_process_a_test_left_behind():
    session = os.environ[SESSION_MARKER]
    forgotten = subprocess.Popen(["sleep", "60"])
    try:
        # Popen returns once the exec has begun; the new program's environment shows in /proc a moment later.
        assert wait_until(lambda: forgotten.pid in leftovers(session, services_before=set()), timeout=5)
        assert forgotten.pid in processes_with_environment(SESSION_MARKER, session)
    finally:
        forgotten.kill()
        forgotten.wait()
    assert forgotten.pid not in leftovers(session, services_before=set())
