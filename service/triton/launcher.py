"""Runs the Triton Inference Server shipped in the `nvidia-pytriton` wheel as a child process.

The wheel carries the `tritonserver` binary, its shared libraries (`nvidia_pytriton.libs`), the Python
backend and one Python backend stub per Python version. Triton expects the stub beside the backend's
library, so `start()` assembles a backend directory (`backends/python/`) in a scratch folder.

How the models' Python finds this virtualenv: the stub embeds libpython in isolated mode, so it
ignores PYTHONPATH. Its interpreter derives `sys.prefix` by looking `python3` up on PATH and reading
the `pyvenv.cfg` beside it. With `<sys.prefix>/bin` first on PATH that is this interpreter's
environment: the stub gets its site-packages (torch, numpy) and runs its `.pth` files, including the
editable install of `service`. LD_LIBRARY_PATH must name this interpreter's LIBDIR so the stub loads
the matching libpython, and the wheel's libs for the server itself. No EXECUTION_ENV_PATH is needed.

The server's working directory is the caller's, so a relative `data_dir` in a model's config
means the same directory as it does for the gateway. `TritonServer(data_dir=...)` overrides that
parameter through AMSERVE_DATA_DIR, the variable that also sets the gateway's data dir.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

from service.banks.shards import REPLICA_ENV
from service.config import KV_DTYPES, LM_DTYPES

log = logging.getLogger("amserve.triton")

DEFAULT_HTTP_PORT = 8010
DEFAULT_GRPC_PORT = 8011
DEFAULT_METRICS_PORT = 8012
LOG_TAIL_LINES = 60
# Logged once this process holds its HTTP port: until then a ready answer on that port may come from
# another server already there, while this one is about to fail to bind.
HTTP_STARTED = "Started HTTPService"
# Seconds between SIGTERM and SIGKILL for what is left of Triton's group: its Python stubs, which exit at once.
GROUP_GRACE_SECONDS = 5.0


class TritonStartError(RuntimeError):
    """Triton exited or did not become ready; the message carries the end of its log."""


def pytriton_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")  # located, not imported: importing pytriton is slow
    if spec is None or not spec.submodule_search_locations:
        raise TritonStartError("the nvidia-pytriton package is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def server_binary() -> Path:
    return pytriton_dir() / "tritonserver" / "bin" / "tritonserver"


def prepare_backends(directory: Path) -> Path:
    """Fill `directory` with Triton's Python backend plus the stub built for this Python; returns it."""
    dist = pytriton_dir() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonStartError(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    python = directory / "python"
    python.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(dist / "backends" / "python" / name, python / name)
    shutil.copy2(stub, python / stub.name)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_members(pgid: int) -> list[int]:
    """The live processes of process group `pgid` (zombies awaiting their reaper are gone already)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _parent, group = stat.read_text().rpartition(")")[2].split()[:3]
        except OSError:
            continue  # it exited while we looked
        if int(group) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def end_processes(members: Callable[[], Iterable[int]], grace: float) -> None:
    """SIGTERM every process `members()` names (with SIGCONT, so a stopped one acts on it), SIGKILL
    those still there after `grace` seconds, and wait a few seconds more for them to be gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = list(members())
        for pid in pids:
            for each in (sig, signal.SIGCONT):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, each)
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = list(members())
        if not pids:
            return
    log.warning("processes %s outlived SIGKILL", pids)


def server_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment; see the module docstring for why each variable is set."""
    env = dict(os.environ)
    libs = [str(pytriton_dir().parent / "nvidia_pytriton.libs"), sysconfig.get_config_var("LIBDIR") or ""]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [*libs, env.get("LD_LIBRARY_PATH", "")] if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.prefix) / "bin"), env.get("PATH", "")])
    env.update(extra or {})
    return env


class TritonServer:
    """One `tritonserver` process serving `model_repository`.

        with TritonServer("model_repository", grpc_port=8011) as triton:
            client = InferenceServerClient(triton.url)
    """

    def __init__(
        self,
        model_repository: str | Path,
        *,
        http_port: int = DEFAULT_HTTP_PORT,
        grpc_port: int = DEFAULT_GRPC_PORT,
        metrics_port: int = DEFAULT_METRICS_PORT,
        address: str = "127.0.0.1",
        data_dir: str | Path | None = None,
        log_path: str | Path | None = None,
        env: dict[str, str] | None = None,
        startup_timeout: float = 120.0,
        stop_timeout: float = 15.0,
        extra_args: tuple[str, ...] = (),
    ):
        """Ports given as 0 are replaced by free ones; `data_dir` overrides the models' data_dir parameter."""
        self.model_repository = Path(model_repository).resolve()
        self.http_port, self.grpc_port, self.metrics_port = (port or free_port()
                                                             for port in (http_port, grpc_port, metrics_port))
        self.address = address
        self.log_path = Path(log_path) if log_path is not None else None
        self.env = dict(env or {})
        if data_dir is not None:
            self.env["AMSERVE_DATA_DIR"] = str(Path(data_dir).resolve())
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.extra_args = tuple(extra_args)
        self._process: subprocess.Popen | None = None
        self._log_thread: threading.Thread | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self._http_started = threading.Event()
        self._scratch: tempfile.TemporaryDirectory | None = None

    # ----- addresses ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """gRPC target `host:port`, what tritonclient.grpc and TritonBackend take."""
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self._client_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.address in ("0.0.0.0", "") else self.address

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def log_tail(self) -> str:
        return "".join(self._tail)

    # ----- lifecycle ------------------------------------------------------------------------

    def command(self, backend_directory: Path) -> list[str]:
        return [
            str(server_binary()),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_directory}",
            f"--http-address={self.address}", f"--http-port={self.http_port}",
            f"--grpc-address={self.address}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.address}", f"--metrics-port={self.metrics_port}",
            # Our models define no auto_complete_config; skipping it saves one stub start per model.
            "--disable-auto-complete-config",
            f"--exit-timeout-secs={max(1, int(self.stop_timeout) - 2)}",
            *self.extra_args,
        ]

    def start(self) -> TritonServer:
        """Launch Triton and block until `/v2/health/ready`; raises TritonStartError otherwise."""
        self.launch()
        self.wait_ready()
        return self

    def launch(self) -> None:
        """Start the process without waiting for it. Triton gets SIGTERM if the thread that called
        this ends (Linux parent-death signal), so a SIGKILLed parent leaves no Triton behind: call it
        from a thread that lives as long as the server, such as the main or event-loop thread."""
        if self.is_alive():
            return
        self.stop()  # reap a process that exited on its own
        if not self.model_repository.is_dir():
            raise TritonStartError(f"model repository {self.model_repository} is not a directory")
        self._scratch = tempfile.TemporaryDirectory(prefix="amserve-triton-")
        backends = prepare_backends(Path(self._scratch.name) / "backends")
        self._tail.clear()
        self._http_started.clear()
        self._process = subprocess.Popen(
            self.command(backends),
            env=server_environment(self.env),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C meant for the parent reaches Triton only through stop()
            preexec_fn=terminate_with_parent,
        )
        self._log_thread = threading.Thread(target=self._forward_log, args=(self._process,),
                                            name="tritonserver-log", daemon=True)
        self._log_thread.start()
        atexit.register(self.stop)
        log.info("tritonserver pid %d: gRPC %s, HTTP %s, metrics %s", self._process.pid, self.url,
                 self.http_url, self.metrics_url)

    def wait_ready(self) -> None:
        """Block until `/v2/health/ready` answers 200; on exit or timeout, stop and raise TritonStartError."""
        deadline = time.monotonic() + self.startup_timeout
        while not (self._http_started.is_set() and self.health_ready(timeout=1.0)):
            if self._process is None or self._process.poll() is not None or time.monotonic() > deadline:
                code = self._process.poll() if self._process is not None else None
                self.stop()  # also waits for the log thread, so the tail is complete
                what = (f"was not ready after {self.startup_timeout:.0f}s" if code is None
                        else f"exited with code {code} before it was ready")
                raise TritonStartError(f"tritonserver {what}; its log ends with:\n{self.log_tail()}")
            time.sleep(0.2)

    def health_ready(self, timeout: float = 1.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=timeout) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def is_alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> int | None:
        """SIGTERM and up to `stop_timeout` seconds for Triton to exit; then whatever is left of its process
        group (its Python stubs, Triton if it ignored SIGTERM) gets SIGTERM and, `GROUP_GRACE_SECONDS`
        later, SIGKILL; also when Triton had died already. Returns Triton's exit code (None if never
        started)."""
        process = self._process
        if process is None:
            return None
        atexit.unregister(self.stop)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver pid %d ignored SIGTERM for %.0fs; ending its group", process.pid,
                            self.stop_timeout)
        # Its Python stubs outlive a Triton that crashed or was killed; only their group still names them.
        end_processes(lambda: group_members(process.pid), GROUP_GRACE_SECONDS)  # leader's pid = group id
        process.wait()
        if self._log_thread is not None:
            self._log_thread.join(timeout=5)
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None
        self._process = None
        return process.returncode

    def _forward_log(self, process: subprocess.Popen) -> None:
        """Drain Triton's output (a full pipe would stall it) into the log file, the logger and the tail."""
        sink = self.log_path.open("a", encoding="utf-8") if self.log_path is not None else None
        try:
            for raw in process.stdout:
                line = raw.decode("utf-8", errors="replace")
                self._tail.append(line)
                if HTTP_STARTED in line:
                    self._http_started.set()
                if sink is not None:
                    sink.write(line)
                    sink.flush()
                log.debug("tritonserver: %s", line.rstrip())
        finally:
            process.stdout.close()
            if sink is not None:
                sink.close()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


_PR_SET_PDEATHSIG = 1
# Looked up before any fork: the child must not load libraries between fork and exec.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def terminate_with_parent() -> None:
    """Runs in the child between fork and exec: ask Linux for SIGTERM when the parent dies."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


# ----- `amserve triton` ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repository", type=Path, default=Path("model_repository"),
                        help="Triton model repository (default ./model_repository)")
    parser.add_argument("--data-dir", type=Path, help="where banks are persisted (default: the models' config)")
    parser.add_argument("--address", default="127.0.0.1", help="address Triton listens on (default 127.0.0.1)")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT)
    parser.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT)
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT)
    parser.add_argument("--log-file", type=Path, help="also append Triton's log to this file")
    parser.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for readiness")
    parser.add_argument("--replica", metavar="INDEX/COUNT",
                        help="this replica's place in the gateway's --triton-url list: of sharded banks it serves "
                             f"the shards placed there (also {REPLICA_ENV}; default: every shard)")
    parser.add_argument("--dtype", choices=LM_DTYPES,
                        help="the llm model's weights (also AMSERVE_DTYPE; default: the exported config's)")
    parser.add_argument("--kv-dtype", choices=KV_DTYPES,
                        help="the llm model's KV cache (also AMSERVE_KV_DTYPE; default: the exported config's)")


def triton_environment(args: argparse.Namespace) -> dict[str, str]:
    """What the models read from the environment, from `amserve triton`'s options (the llm model
    takes AMSERVE_DTYPE / AMSERVE_KV_DTYPE over its exported parameters)."""
    env = {REPLICA_ENV: args.replica} if args.replica else {}
    if args.dtype:
        env["AMSERVE_DTYPE"] = args.dtype
    if args.kv_dtype:
        env["AMSERVE_KV_DTYPE"] = args.kv_dtype
    return env


def run(args: argparse.Namespace) -> int:
    """Start Triton, then wait until it exits or SIGINT/SIGTERM arrives; returns the exit status."""
    server = TritonServer(args.model_repository, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, address=args.address, data_dir=args.data_dir,
                          log_path=args.log_file, startup_timeout=args.startup_timeout,
                          env=triton_environment(args))
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        print(f"tritonserver ready: gRPC {server.url}, HTTP {server.http_url}, metrics {server.metrics_url}",
              flush=True)
        while server.is_alive() and not stop.wait(0.5):
            pass
        if not server.is_alive():
            print(f"tritonserver exited; its log ends with:\n{server.log_tail()}", file=sys.stderr)
            return 1
        return 0
    except TritonStartError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
