"""The bundled tritonserver as a child process: readiness, a clean stop, and clear start failures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from service.triton.launcher import TritonServer, TritonStartError
from tests.helpers import running, wait_until
from tests.triton.fixtures import MEMORY_ONLY, export_for_tests, launch

pytestmark = pytest.mark.triton


def stubs_of(pid: int) -> list[int]:
    """The Python backend stubs Triton `pid` started, found by their parent and name."""
    children = (Path("/proc") / str(pid) / "task" / str(pid) / "children").read_text().split()
    return [int(child) for child in children
            if Path(f"/proc/{child}/comm").read_text().strip() == "triton_python_b"]  # comm: 15 characters


def test_ready_then_stop_leaves_no_process(tmp_path):
    repository = export_for_tests(tmp_path / "repository", tmp_path / "data", MEMORY_ONLY)
    log_path = tmp_path / "triton.log"
    # An empty AMSERVE_DATA_DIR leaves the data dir to the config's parameter.
    with TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0, log_path=log_path,
                      env={"AMSERVE_DATA_DIR": ""}) as server:
        assert server.is_alive() and server.health_ready()
        pid, stubs = server.pid, stubs_of(server.pid)
        assert stubs, "one stub per model instance"
    assert not server.is_alive() and not server.health_ready()
    assert not running(pid) and not any(map(running, stubs))
    assert "successfully loaded 'associative_memory'" in log_path.read_text()
    assert (tmp_path / "data" / "banks.sqlite3").exists()  # the model opened the config's data dir


def test_no_stub_outlives_a_killed_triton(tmp_path):
    """A Triton killed by SIGKILL leaves its Python stubs running; stop() ends them. The stubs are
    stopped (SIGSTOP) first, as a stub stuck in its model would be, so that none leaves by itself."""
    server = launch(tmp_path, MEMORY_ONLY)
    try:
        stubs = stubs_of(server.pid)
        assert stubs
        for stub in stubs:
            os.kill(stub, signal.SIGSTOP)
        os.kill(server.pid, signal.SIGKILL)
        assert wait_until(lambda: not server.is_alive(), timeout=10)
        assert all(map(running, stubs)), "the stubs outlive the killed Triton"
    finally:
        server.stop()
    assert not any(map(running, stubs))


def test_a_model_that_fails_to_load_stops_start_with_its_error(tmp_path):
    repository = export_for_tests(tmp_path / "repository", tmp_path / "data", MEMORY_ONLY)
    (repository / "associative_memory" / "1" / "model.py").write_text(
        'raise RuntimeError("model file damaged on purpose")\n')
    server = TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0, startup_timeout=60)
    with pytest.raises(TritonStartError, match="exited with code") as info:
        server.start()
    assert "model file damaged on purpose" in str(info.value)
    assert not server.is_alive()


def test_ports_held_by_another_server_fail_the_start(tmp_path, triton_server):
    """The other server answers ready on those ports; that must not pass for this one's readiness."""
    repository = export_for_tests(tmp_path / "repository", tmp_path / "data", MEMORY_ONLY)
    server = TritonServer(repository, http_port=triton_server.http_port, grpc_port=triton_server.grpc_port,
                          metrics_port=triton_server.metrics_port, startup_timeout=60)
    with pytest.raises(TritonStartError, match="exited with code"):
        server.start()
    assert triton_server.health_ready()


def test_a_missing_repository_is_refused_before_launch(tmp_path):
    with pytest.raises(TritonStartError, match="not a directory"):
        TritonServer(tmp_path / "nowhere", http_port=0, grpc_port=0, metrics_port=0).start()


def test_triton_follows_a_killed_parent(tmp_path):
    repository = export_for_tests(tmp_path / "repository", tmp_path / "data", MEMORY_ONLY)
    parent = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from service.triton.launcher import TritonServer\n"
         "server = TritonServer(sys.argv[1], http_port=0, grpc_port=0, metrics_port=0).start()\n"
         "print(server.pid, flush=True)\n"
         "time.sleep(600)\n",
         str(repository)],
        stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
        stubs = stubs_of(pid)
        assert running(pid) and stubs
    finally:
        parent.kill()
        parent.wait()
    # Triton's graceful shutdown, stubs included, takes a few seconds.
    assert wait_until(lambda: not running(pid) and not any(map(running, stubs)), timeout=30)
