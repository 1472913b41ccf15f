from __future__ import annotations

import os
import re
import uuid

import grpc
import httpx
import pytest

from tests.harness import ServerProcess
from tests.helpers import processes_matching, processes_with_environment, wait_until
from tests.postgres import PostgresCluster

# The API suite runs against each: the embedded and triton backends on SQLite, and the embedded
# backend as a replica of a PostgreSQL store.
BACKENDS = ["embedded", "triton", "postgresql"]
# In the environment of the test run, so every process it starts inherits it (Triton's stubs included).
SESSION_MARKER = "AMSERVE_TEST_SESSION"
# Servers a test may start that keep their own environment: flagged when they appear during the run.
SERVICES = re.compile(r"postgres -D|llama-server|chromium.*headless")


def leftovers(session: str, services_before: set[int]) -> dict[int, str]:
    found = processes_with_environment(SESSION_MARKER, session)
    found.pop(os.getpid(), None)
    return found | {pid: command for pid, command in processes_matching(SERVICES).items() if pid not in services_before}


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_run():
    """Fails the run if a process it started is still alive once every other fixture is torn down."""
    session = os.environ[SESSION_MARKER] = uuid.uuid4().hex
    services_before = set(processes_matching(SERVICES))
    yield
    wait_until(lambda: not leftovers(session, services_before), timeout=10)  # ones ending right now
    if left := leftovers(session, services_before):
        pytest.fail("processes started by the tests outlived them:\n"
                    + "\n".join(f"  {pid}: {command}" for pid, command in sorted(left.items())), pytrace=False)


@pytest.fixture(scope="session")
def postgres():
    """One throwaway PostgreSQL cluster for the run; tests take a database of their own from it."""
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture()
def postgres_dsn(postgres, request) -> str:
    """A fresh, empty database on the test cluster."""
    return postgres.create_database(re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40] + uuid.uuid4().hex[:8])


@pytest.fixture(scope="session", params=BACKENDS)
def server(request, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp(f"data-{request.param}")
    if request.param == "postgresql":
        dsn = request.getfixturevalue("postgres").create_database("api_suite")
        server = ServerProcess(data_dir, backend="embedded", extra_args=["--store", dsn])
    else:
        server = ServerProcess(data_dir, backend=request.param)
    with server as proc:
        yield proc


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=60.0) as c:
        yield c


@pytest.fixture()
def stub(server):
    from service.api.pb import amserve_pb2_grpc

    with grpc.insecure_channel(server.grpc_target) as channel:
        yield amserve_pb2_grpc.AmserveStub(channel)


@pytest.fixture()
def bank_name(request) -> str:
    """A fresh bank name per test, valid under the bank-name rule."""
    return re.sub(r"[^a-z0-9_-]", "-", "t-" + request.node.name.lower())[:50] + uuid.uuid4().hex[:6]


@pytest.fixture()
def embedded_only(server):
    """For tests of the gateway's own machinery that the triton backend hands to Triton instead."""
    if server.backend != "embedded":
        pytest.skip(f"checks the embedded backend's own batcher; {server.backend} batches inside Triton")
