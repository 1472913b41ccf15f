"""Durable bank storage: what every store does, and SQLite (WAL, synchronous=FULL), the embedded default.

A write returns only after its transaction has committed, so an acknowledged store survives a crash
(SIGKILL or power loss). Serving state (pattern matrices, DrDAM's T) is derived: rebuilt from a
snapshot on start, then kept up by applying the change log in version order.

Every bank has a version that each committed write (store, delete of a pattern) advances by one,
assigned inside the writing transaction while it holds the bank's row, and a change log of
(bank, version, op, ids, vectors) from which any replica catches up from any version. A store of
ids that are all there already with the same vectors is a no-op and advances nothing. A bank's `uid`
tells a re-created bank from the one deleted before it under the same name.

`open_store` picks the implementation: a data dir for SQLite, a postgresql:// DSN for PostgreSQL
(service/banks/postgres.py), which several processes share.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from service.errors import AlreadyExists, Conflict, InvalidArgument, NotFound, Unavailable

log = logging.getLogger(__name__)

STORE_OPS = ("store", "delete")


@dataclass(frozen=True)
class BankRecord:
    name: str
    kind: str
    dim: int
    params: dict
    uid: str = ""  # set by the store at creation
    version: int = 0


@dataclass(frozen=True)
class Change:
    """One committed write of a bank: op "store" (ids, K×D vectors) or "delete" (one id, its vector)."""

    version: int
    op: str
    ids: list[str]
    vectors: np.ndarray
    committed_at: float | None = None  # Unix time of the commit, where the store records it


class Store(Protocol):
    """What the registry needs from durable storage; both implementations pass the same tests."""

    shared: bool  # other processes write to it too: replicas must follow its change log

    def banks(self) -> list[BankRecord]: ...

    def bank(self, name: str) -> BankRecord | None: ...

    def snapshot(self, record: BankRecord, chunk: int = 65536) -> tuple[int, Iterator[tuple[list[str], np.ndarray]]]:
        """(version, the patterns at that version in chunks), read in one consistent snapshot."""
        ...

    def changes(self, record: BankRecord, after: int) -> list[Change]:
        """The bank's changes with versions after `after`, in version order."""
        ...

    def create_bank(self, record: BankRecord) -> BankRecord: ...

    def delete_bank(self, name: str) -> None: ...

    def store_patterns(self, bank: str, ids: list[str], vectors: np.ndarray) -> tuple[int, list[int], int]:
        """Commit the patterns not stored yet; returns (bank version after, indices of those stored now,
        patterns in the bank after).
        Conflict naming ids[i] if an id is stored with another vector; NotFound if the bank is gone."""
        ...

    def delete_pattern(self, bank: str, pattern_id: str) -> tuple[int, np.ndarray]:
        """Commit the deletion; returns (bank version after, the deleted vector)."""
        ...

    def wait_for_changes(self, timeout: float) -> dict[str, int] | None:
        """Wait until another process may have committed writes, or `timeout` seconds: {bank: version
        committed} for the banks written (0 where one was created or deleted), or None when it cannot
        say (the timeout passed; a notification may have been lost)."""
        ...

    def close(self) -> None: ...


def open_store(location: str | Path) -> Store:
    """A PostgreSQL store for a postgresql:// (or postgres://) DSN, else SQLite under the data dir."""
    text = str(location)
    if text.startswith(("postgresql://", "postgres://")):
        from service.banks.postgres import PostgresStore

        return PostgresStore(text)
    if "://" in text:
        raise InvalidArgument(f"store {text!r}: expected a data directory or a postgresql:// DSN", field="store")
    return SQLiteStore(location)


def vector_bytes(vectors: np.ndarray) -> bytes:
    return np.ascontiguousarray(vectors, dtype=np.float32).tobytes()


def vectors_from(blob: bytes, dim: int) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32).reshape(-1, dim)


def patterns_chunk(rows: list[tuple[str, bytes]], dim: int) -> tuple[list[str], np.ndarray]:
    """(ids, K×D float32) of fetched (id, vector) rows: one chunk of a snapshot."""
    return [pid for pid, _ in rows], vectors_from(b"".join(bytes(vector) for _, vector in rows), dim)


def check_new_patterns(ids: list[str], vectors: np.ndarray, stored: dict[str, bytes]) -> list[int]:
    """Indices of the patterns to insert given the vectors already `stored` under some of the ids:
    the same vector again is an idempotent retry, another one a Conflict naming ids[i]."""
    fresh = []
    for i, pid in enumerate(ids):
        if pid not in stored:
            fresh.append(i)
        elif stored[pid] != vector_bytes(vectors[i]):
            raise Conflict(f"id '{pid}' is already stored with a different pattern", field=f"ids[{i}]")
    return fresh


# ----- SQLite ---------------------------------------------------------------------------------

# PRAGMA user_version counts the migrations applied; a data dir of an earlier release has 0 and the
# first schema, which the first migration creates only where it is missing.
SQLITE_MIGRATIONS = (
    """
    CREATE TABLE IF NOT EXISTS banks (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        dim INTEGER NOT NULL,
        params TEXT NOT NULL,
        created_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP
    );
    CREATE TABLE IF NOT EXISTS patterns (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        bank TEXT NOT NULL REFERENCES banks(name) ON DELETE CASCADE,
        id TEXT NOT NULL,
        vector BLOB NOT NULL,
        UNIQUE (bank, id)
    );
    """,
    """
    ALTER TABLE banks ADD COLUMN uid TEXT NOT NULL DEFAULT '';
    UPDATE banks SET uid = lower(hex(randomblob(16))) WHERE uid = '';
    ALTER TABLE banks ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE banks ADD COLUMN pattern_count INTEGER NOT NULL DEFAULT 0;
    UPDATE banks SET pattern_count = (SELECT count(*) FROM patterns WHERE patterns.bank = banks.name);
    CREATE TABLE changes (
        bank TEXT NOT NULL REFERENCES banks(name) ON DELETE CASCADE,
        version INTEGER NOT NULL,
        op TEXT NOT NULL,
        ids TEXT NOT NULL,
        vectors BLOB NOT NULL,
        PRIMARY KEY (bank, version)
    );
    """,
)


def read_only_filesystem(directory: Path) -> bool:
    return bool(os.statvfs(directory).f_flag & os.ST_RDONLY) or not os.access(directory, os.W_OK)


class SQLiteStore:
    """One connection guarded by a lock: SQLite serialises writers anyway, and one connection keeps
    every acknowledged write visible to the next read without extra coordination. One process owns
    the file, so there is nobody else's change log to follow."""

    shared = False

    def __init__(self, data_dir: str | Path):
        self.path = Path(data_dir) / "banks.sqlite3"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.read_only = read_only_filesystem(self.path.parent)
            if self.read_only:
                # Serve what is there; every write then fails as Unavailable (503) instead of the service
                # refusing to start. A cleanly closed database has no WAL left to replay.
                log.warning("bank data dir %s is read-only: banks are served, writes are refused", self.path.parent)
            self._db = self._connect()
            if not self.read_only:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("PRAGMA foreign_keys=ON")
                self._migrate()
        except (sqlite3.Error, OSError) as exc:
            raise Unavailable(f"cannot open the bank database at {self.path}: {exc}") from exc
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            return sqlite3.connect(f"{self.path.as_uri()}?mode=ro&immutable=1", uri=True, check_same_thread=False,
                                   isolation_level=None)
        return sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)

    def _migrate(self) -> None:
        applied = self._db.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(SQLITE_MIGRATIONS[applied:], start=applied + 1):
            # executescript commits first; the migration and its number commit together.
            self._db.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {number}; COMMIT;")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; any storage failure leaves the database unchanged (503)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                if isinstance(exc, (sqlite3.Error, OSError)) and not isinstance(exc, sqlite3.IntegrityError):
                    raise Unavailable(f"bank storage failed: {exc}") from exc
                raise

    def _record(self, row) -> BankRecord:
        name, kind, dim, params, uid, version = row
        return BankRecord(name, kind, dim, json.loads(params), uid, version)

    def banks(self) -> list[BankRecord]:
        with self._lock:
            rows = self._db.execute("SELECT name, kind, dim, params, uid, version FROM banks ORDER BY name").fetchall()
        return [self._record(row) for row in rows]

    def bank(self, name: str) -> BankRecord | None:
        with self._lock:
            row = self._db.execute("SELECT name, kind, dim, params, uid, version FROM banks WHERE name = ?",
                                   (name,)).fetchone()
        return None if row is None else self._record(row)

    def snapshot(self, record: BankRecord, chunk: int = 65536) -> tuple[int, Iterator[tuple[list[str], np.ndarray]]]:
        """Read on a connection of its own inside one read transaction (WAL lets writers go on), so a
        large bank is streamed in chunks and never sits in RAM twice."""
        reader = self._connect()
        reader.execute("BEGIN")
        row = reader.execute("SELECT version FROM banks WHERE name = ? AND uid = ?",
                             (record.name, record.uid)).fetchone()
        if row is None:
            reader.close()
            raise NotFound(f"bank '{record.name}' does not exist", field="bank")

        def chunks() -> Iterator[tuple[list[str], np.ndarray]]:
            try:
                cursor = reader.execute("SELECT id, vector FROM patterns WHERE bank = ? ORDER BY seq", (record.name,))
                while part := cursor.fetchmany(chunk):
                    yield patterns_chunk(part, record.dim)
            finally:
                reader.close()
        return row[0], chunks()

    def changes(self, record: BankRecord, after: int) -> list[Change]:
        with self._lock:
            rows = self._db.execute(
                "SELECT c.version, c.op, c.ids, c.vectors FROM changes c JOIN banks b ON b.name = c.bank "
                "WHERE c.bank = ? AND b.uid = ? AND c.version > ? ORDER BY c.version",
                (record.name, record.uid, after)).fetchall()
        return [Change(version, op, json.loads(ids), vectors_from(blob, record.dim)) for version, op, ids, blob in rows]

    def create_bank(self, record: BankRecord) -> BankRecord:
        created = BankRecord(record.name, record.kind, record.dim, record.params, uuid.uuid4().hex, 0)
        try:
            with self._transaction() as db:
                db.execute("INSERT INTO banks (name, kind, dim, params, uid, version) VALUES (?, ?, ?, ?, ?, 0)",
                           (created.name, created.kind, created.dim, json.dumps(created.params), created.uid))
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"bank '{record.name}' already exists", field="bank") from exc
        return created

    def delete_bank(self, name: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM banks WHERE name = ?", (name,))

    def _advance(self, db: sqlite3.Connection, bank: str, op: str, ids: list[str], vectors: np.ndarray
                 ) -> tuple[int, int]:
        """Next version and pattern count of the bank, with the change logged."""
        change = len(ids) if op == "store" else -len(ids)
        version, count = db.execute("UPDATE banks SET version = version + 1, pattern_count = pattern_count + ? "
                                     "WHERE name = ? RETURNING version, pattern_count", (change, bank)).fetchone()
        db.execute("INSERT INTO changes (bank, version, op, ids, vectors) VALUES (?, ?, ?, ?, ?)",
                   (bank, version, op, json.dumps(ids), vector_bytes(vectors)))
        return version, count

    def store_patterns(self, bank: str, ids: list[str], vectors: np.ndarray) -> tuple[int, list[int], int]:
        with self._transaction() as db:
            row = db.execute("SELECT version, pattern_count FROM banks WHERE name = ?", (bank,)).fetchone()
            if row is None:
                raise NotFound(f"bank '{bank}' does not exist", field="bank")
            marks = ",".join("?" * len(ids))
            stored = dict(db.execute(f"SELECT id, vector FROM patterns WHERE bank = ? AND id IN ({marks})",
                                     (bank, *ids)).fetchall())
            fresh = check_new_patterns(ids, vectors, stored)
            if not fresh:
                return row[0], [], row[1]
            new_ids, new_vectors = [ids[i] for i in fresh], vectors[fresh]
            db.executemany("INSERT INTO patterns (bank, id, vector) VALUES (?, ?, ?)",
                           [(bank, pid, vector_bytes(v)) for pid, v in zip(new_ids, new_vectors)])
            version, count = self._advance(db, bank, "store", new_ids, new_vectors)
            return version, fresh, count

    def delete_pattern(self, bank: str, pattern_id: str) -> tuple[int, np.ndarray]:
        with self._transaction() as db:
            row = db.execute("SELECT p.vector, b.dim FROM patterns p JOIN banks b ON b.name = p.bank "
                             "WHERE p.bank = ? AND p.id = ?", (bank, pattern_id)).fetchone()
            if row is None:
                raise NotFound(f"pattern '{pattern_id}' is not in bank '{bank}'", field="id")
            vector = vectors_from(row[0], row[1])
            db.execute("DELETE FROM patterns WHERE bank = ? AND id = ?", (bank, pattern_id))
            return self._advance(db, bank, "delete", [pattern_id], vector)[0], vector[0]

    def wait_for_changes(self, timeout: float) -> dict[str, int] | None:
        threading.Event().wait(timeout)  # nobody else writes here
        return None
