"""PostgreSQL as the shared durable store (`--store postgresql://…`), through psycopg 3 and its pool.

psycopg rather than asyncpg: the registry's writes already run on worker threads (the embedded
backend's write thread, Triton's model instances), so a synchronous driver fits without a second
event loop, and psycopg_pool gives a connection pool with health checks and reconnection.

A write commits with synchronous_commit on before it is acknowledged. Its version comes from
`UPDATE banks SET version = version + 1 … RETURNING version` inside the writing transaction: the
row lock orders the bank's writers, so versions follow commit order (a sequence's would not).
The same transaction inserts the change-log row and a NOTIFY ("<version> <bank>", delivered at
commit), which wakes the replicas; they catch up by version, so a lost notification costs at most
one poll interval, and a replica already at the notified version (its own write) does nothing.

Schema migrations are numbered and applied at start under an advisory lock, so replicas starting
together do not race.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid
from collections.abc import Iterator

import numpy as np
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from service.banks.store import BankRecord, Change, check_new_patterns, patterns_chunk, vector_bytes, vectors_from
from service.errors import AlreadyExists, InvalidArgument, NotFound, ServiceError, Unavailable

log = logging.getLogger(__name__)

CHANNEL = "amserve_changes"
# The version bump, the change-log row and the notification of one committed write.
ADVANCE = """
WITH bumped AS (
    UPDATE banks SET version = version + 1, pattern_count = pattern_count + %(change)s
    WHERE name = %(bank)s RETURNING version, pattern_count
), logged AS (
    INSERT INTO changes (bank, version, op, ids, vectors)
    SELECT %(bank)s::text, version, %(op)s::text, %(ids)s::jsonb, %(vectors)s::bytea FROM bumped
)
SELECT version, pattern_count, pg_notify(%(channel)s::text, version::text || ' ' || %(bank)s::text) FROM bumped
"""
MIGRATION_LOCK = 0x616D7365  # pg_advisory_xact_lock key: "amse"
MIGRATIONS = (
    """
    CREATE TABLE banks (
        name TEXT PRIMARY KEY,
        uid TEXT NOT NULL,
        kind TEXT NOT NULL,
        dim INTEGER NOT NULL,
        params JSONB NOT NULL,
        version BIGINT NOT NULL DEFAULT 0,
        pattern_count BIGINT NOT NULL DEFAULT 0,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now()
    );
    CREATE TABLE patterns (
        seq BIGSERIAL PRIMARY KEY,
        bank TEXT NOT NULL REFERENCES banks(name) ON DELETE CASCADE,
        id TEXT NOT NULL,
        vector BYTEA NOT NULL,
        UNIQUE (bank, id)
    );
    CREATE TABLE changes (
        bank TEXT NOT NULL REFERENCES banks(name) ON DELETE CASCADE,
        version BIGINT NOT NULL,
        op TEXT NOT NULL,
        ids JSONB NOT NULL,
        vectors BYTEA NOT NULL,
        PRIMARY KEY (bank, version)
    );
    """,
    # When each write committed (Unix seconds), so replicas can tell how far behind they apply it.
    """
    ALTER TABLE changes ADD COLUMN committed_at DOUBLE PRECISION NOT NULL
        DEFAULT extract(epoch FROM clock_timestamp());
    """,
)
# How long a call waits for a pooled connection before answering 503: PostgreSQL away must be a
# quick, clear refusal, never a hang.
CONNECT_TIMEOUT_S = 2.0
STATEMENT_TIMEOUT_MS = 10_000
# TCP keepalives find a peer that went silent (a partition) within ~10 s rather than the kernel's hours.
KEEPALIVES = {"keepalives": 1, "keepalives_idle": 4, "keepalives_interval": 2, "keepalives_count": 3}


def checked_dsn(dsn: str) -> str:
    """The DSN if libpq can parse it; InvalidArgument naming the setting otherwise."""
    try:
        parts = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise InvalidArgument(f"store: not a valid PostgreSQL DSN ({exc})", field="store") from None
    ports = str(parts.get("port", "5432")).split(",")
    if not all(port.isdigit() and 0 < int(port) < 65536 for port in ports):  # libpq parses it only on connect
        raise InvalidArgument(f"store: not a valid PostgreSQL DSN (port {parts['port']!r})", field="store")
    return dsn


def _configure(conn: psycopg.Connection) -> None:
    conn.execute("SET synchronous_commit = on")
    # A statement that cannot finish (a partition that drops packets, a lock held elsewhere) fails
    # instead of holding its caller: the caller answers 503 and the pool replaces the connection.
    conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
    conn.commit()


class PostgresStore:
    shared = True

    def __init__(self, dsn: str, *, max_connections: int = 4):
        self.dsn = checked_dsn(dsn)
        connect = {"connect_timeout": max(1, round(CONNECT_TIMEOUT_S)), **KEEPALIVES}
        self.pool = ConnectionPool(self.dsn, min_size=1, max_size=max_connections, kwargs=connect,
                                   configure=_configure, timeout=CONNECT_TIMEOUT_S, open=False,
                                   name="amserve-store")
        self._listener: psycopg.Connection | None = None
        self._listener_lock = threading.Lock()
        try:
            self.pool.open(wait=True, timeout=CONNECT_TIMEOUT_S * 5)
            self._migrate()
        except (psycopg.Error, PoolTimeout) as exc:
            self.pool.close()
            raise Unavailable(f"cannot reach the PostgreSQL store: {exc}") from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection]:
        """One transaction on a pooled connection; PostgreSQL unreachable is 503 with Retry-After."""
        try:
            with self.pool.connection() as conn, conn.transaction():
                yield conn
        except ServiceError:
            raise
        except psycopg.errors.UniqueViolation:
            raise
        except (psycopg.Error, PoolTimeout) as exc:
            raise Unavailable(f"the PostgreSQL store is unavailable: {exc}", retry_after=1.0) from exc

    def _migrate(self) -> None:
        with self._transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                         "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            (applied,) = conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
            for number, script in enumerate(MIGRATIONS[applied:], start=applied + 1):
                conn.execute(script)
                conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (number,))
                log.warning("PostgreSQL store: applied schema migration %d", number)

    def close(self) -> None:
        with self._listener_lock:
            if self._listener is not None:
                self._listener.close()
        self.pool.close()

    # ----- reads ------------------------------------------------------------------------------

    @staticmethod
    def _record(row) -> BankRecord:
        name, kind, dim, params, uid, version = row
        return BankRecord(name, kind, dim, params, uid, version)

    def banks(self) -> list[BankRecord]:
        with self._transaction() as conn:
            rows = conn.execute("SELECT name, kind, dim, params, uid, version FROM banks ORDER BY name").fetchall()
        return [self._record(row) for row in rows]

    def bank(self, name: str) -> BankRecord | None:
        with self._transaction() as conn:
            row = conn.execute("SELECT name, kind, dim, params, uid, version FROM banks WHERE name = %s",
                               (name,)).fetchone()
        return None if row is None else self._record(row)

    def snapshot(self, record: BankRecord, chunk: int = 65536) -> tuple[int, Iterator[tuple[list[str], np.ndarray]]]:
        """The patterns read in chunks inside one REPEATABLE READ transaction, so they are exactly
        the bank at the version read first. The generator holds its connection until exhausted."""
        stack = contextlib.ExitStack()
        conn = stack.enter_context(self._transaction())
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        row = conn.execute("SELECT version FROM banks WHERE name = %s AND uid = %s",
                           (record.name, record.uid)).fetchone()
        if row is None:
            stack.close()
            raise NotFound(f"bank '{record.name}' does not exist", field="bank")

        def chunks() -> Iterator[tuple[list[str], np.ndarray]]:
            with stack:
                cursor = conn.cursor(name="snapshot")
                cursor.execute("SELECT id, vector FROM patterns WHERE bank = %s ORDER BY seq", (record.name,))
                while part := cursor.fetchmany(chunk):
                    yield patterns_chunk(part, record.dim)
        return row[0], chunks()

    def changes(self, record: BankRecord, after: int) -> list[Change]:
        with self._transaction() as conn:
            rows = conn.execute(
                "SELECT c.version, c.op, c.ids, c.vectors, c.committed_at "
                "FROM changes c JOIN banks b ON b.name = c.bank "
                "WHERE c.bank = %s AND b.uid = %s AND c.version > %s ORDER BY c.version",
                (record.name, record.uid, after)).fetchall()
        return [Change(version, op, ids, vectors_from(bytes(blob), record.dim), committed_at)
                for version, op, ids, blob, committed_at in rows]

    # ----- writes -----------------------------------------------------------------------------

    def create_bank(self, record: BankRecord) -> BankRecord:
        created = BankRecord(record.name, record.kind, record.dim, record.params, uuid.uuid4().hex, 0)
        try:
            with self._transaction() as conn:
                conn.execute("INSERT INTO banks (name, kind, dim, params, uid) VALUES (%s, %s, %s, %s, %s)",
                             (created.name, created.kind, created.dim, json.dumps(created.params), created.uid))
                conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"0 {created.name}"))
        except psycopg.errors.UniqueViolation as exc:
            raise AlreadyExists(f"bank '{record.name}' already exists", field="bank") from exc
        return created

    def delete_bank(self, name: str) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM banks WHERE name = %s", (name,))
            conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"0 {name}"))

    def _advance(self, conn: psycopg.Connection, bank: str, op: str, ids: list[str], vectors: np.ndarray
                 ) -> tuple[int, int]:
        """Next version and pattern count of the bank, with the change logged and announced: one
        statement, so one round trip."""
        change = len(ids) if op == "store" else -len(ids)
        version, count, _ = conn.execute(ADVANCE, {"bank": bank, "change": change, "op": op, "ids": json.dumps(ids),
                                                   "vectors": vector_bytes(vectors), "channel": CHANNEL}).fetchone()
        return version, count

    def store_patterns(self, bank: str, ids: list[str], vectors: np.ndarray) -> tuple[int, list[int], int]:
        with self._transaction() as conn, conn.pipeline():
            # Pipelined: the second statement runs after the first holds the bank's row lock, which
            # orders the bank's writers, so the ids it reads cannot change under us.
            locked = conn.execute("SELECT version, pattern_count FROM banks WHERE name = %s FOR UPDATE", (bank,))
            present = conn.execute("SELECT id, vector FROM patterns WHERE bank = %s AND id = ANY(%s)", (bank, ids))
            row = locked.fetchone()
            if row is None:
                raise NotFound(f"bank '{bank}' does not exist", field="bank")
            fresh = check_new_patterns(ids, vectors, {pid: bytes(vector) for pid, vector in present})
            if not fresh:
                return row[0], [], row[1]
            new_ids, new_vectors = [ids[i] for i in fresh], vectors[fresh]
            with conn.cursor() as cursor:
                cursor.executemany("INSERT INTO patterns (bank, id, vector) VALUES (%s, %s, %s)",
                                   [(bank, pid, vector_bytes(v)) for pid, v in zip(new_ids, new_vectors)])
            version, count = self._advance(conn, bank, "store", new_ids, new_vectors)
            return version, fresh, count

    def delete_pattern(self, bank: str, pattern_id: str) -> tuple[int, np.ndarray]:
        with self._transaction() as conn:
            conn.execute("SELECT 1 FROM banks WHERE name = %s FOR UPDATE", (bank,))
            row = conn.execute("DELETE FROM patterns p USING banks b WHERE b.name = p.bank AND p.bank = %s "
                               "AND p.id = %s RETURNING p.vector, b.dim", (bank, pattern_id)).fetchone()
            if row is None:
                raise NotFound(f"pattern '{pattern_id}' is not in bank '{bank}'", field="id")
            vector = vectors_from(bytes(row[0]), row[1])
            return self._advance(conn, bank, "delete", [pattern_id], vector)[0], vector[0]

    # ----- following --------------------------------------------------------------------------

    def wait_for_changes(self, timeout: float) -> dict[str, int] | None:
        """{bank: version} from the notifications that arrive within `timeout` (the first, then all
        already pending: a burst of commits costs one catch-up, not one each); version 0 for a bank
        created or deleted. None after a quiet `timeout` or when the listening connection broke
        (reopened on the next call)."""
        with self._listener_lock:
            try:
                if self._listener is None or self._listener.closed:
                    self._listener = psycopg.connect(self.dsn, autocommit=True, connect_timeout=max(1, round(timeout)),
                                                     **KEEPALIVES)
                    self._listener.execute(f"LISTEN {CHANNEL}")
                notes = list(self._listener.notifies(timeout=timeout, stop_after=1))
                if notes:
                    notes += self._listener.notifies(timeout=0.001)
                banks: dict[str, int] = {}
                for note in notes:  # "<version> <bank>"
                    version, _, bank = note.payload.partition(" ")
                    banks[bank] = 0 if banks.get(bank, -1) == 0 else max(int(version), banks.get(bank, 0))
                return banks or None
            except psycopg.Error:
                if self._listener is not None:
                    self._listener.close()
                threading.Event().wait(timeout)
                return None
