"""A real Triton serving a freshly exported model repository, for any test package:

    from tests.triton.fixtures import triton_server  # noqa: F401  (in a conftest.py)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.config import Settings
from service.triton.export import export
from service.triton.launcher import TritonServer


def export_for_tests(repository: Path, data_dir: Path, **batching) -> Path:
    """The service's default export, with its own data dir; `batching` overrides the knobs."""
    defaults = Settings()
    knobs = dict(max_batch_size=defaults.max_batch_size, max_queue_delay_us=defaults.max_queue_delay_us,
                 max_queue_size=defaults.max_queue_size)
    export(repository, data_dir=data_dir, device_kind="auto", **{**knobs, **batching})
    return repository


def launch(root: Path, **batching) -> TritonServer:
    """Export into `root`/repository and start Triton on free ports, banks under `root`/data."""
    repository = export_for_tests(root / "repository", root / "data", **batching)
    return TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0, data_dir=root / "data",
                        log_path=root / "tritonserver.log").start()


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory) -> Iterator[TritonServer]:
    server = launch(tmp_path_factory.mktemp("triton"))
    try:
        yield server
    finally:
        server.stop()
