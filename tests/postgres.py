"""A throwaway PostgreSQL cluster for tests: the Debian server binaries' initdb and pg_ctl in a temp dir,
listening on a free loopback port, stopped (and so never left running) when the test is done.

PostgreSQL refuses to run as root, so under root (CI) the cluster runs as the `postgres` system user
that the Debian package creates.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from tests.harness import free_port

BINARIES = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))


def server_binaries() -> Path:
    if not BINARIES:
        pytest.fail("PostgreSQL server binaries are missing: `make setup` installs the postgresql-15 package")
    return BINARIES[-1].parent


class PostgresCluster:
    """In a scratch dir of its own (removed on exit): under root the `postgres` user must be able to
    reach it, which pytest's per-user temp tree does not allow."""

    def __init__(self, database: str = "amserve"):
        self.bin = server_binaries()
        self.directory = Path(tempfile.mkdtemp(prefix="amserve-postgres-"))
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self.database = database
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    @property
    def dsn(self) -> str:
        return f"postgresql://amserve@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *command: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        if os.geteuid() == 0:
            command = ("runuser", "-u", self.user, "--", *command)
        return subprocess.run(command, check=check, capture_output=True, text=True, timeout=timeout)

    def initialise(self) -> PostgresCluster:
        if os.geteuid() == 0:
            shutil.chown(self.directory, self.user, self.user)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "amserve", "--auth=trust", "--no-sync",
                  "--no-instructions")
        return self

    def start(self) -> PostgresCluster:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        if self.database not in self._run(str(self.bin / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                                          "amserve", "-d", "postgres", "-Atc", "SELECT datname FROM pg_database"
                                          ).stdout.split():
            self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "amserve",
                      self.database)
        return self

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its DSN."""
        with psycopg.connect(self.dsn.rpartition("/")[0] + "/postgres", autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn.rpartition("/")[0] + f"/{name}"

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop; "immediate" ends the server like a crash (recovery replays the WAL at start)."""
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def __enter__(self) -> PostgresCluster:
        return self.initialise().start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
