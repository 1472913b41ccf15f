"""Durable bank storage: SQLite in WAL mode with synchronous=FULL.

A write returns only after its transaction has committed, so an acknowledged store survives a crash
(SIGKILL or power loss). Serving state (pattern matrices, DrDAM's T) is rebuilt from here on start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from service.errors import AlreadyExists, NotFound, Unavailable

log = logging.getLogger(__name__)

SCHEMA = """
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
"""


def read_only_filesystem(directory: Path) -> bool:
    return bool(os.statvfs(directory).f_flag & os.ST_RDONLY) or not os.access(directory, os.W_OK)


@dataclass(frozen=True)
class BankRecord:
    name: str
    kind: str
    dim: int
    params: dict


class SQLiteStore:
    """One connection guarded by a lock: SQLite serialises writers anyway, and one connection keeps
    every acknowledged write visible to the next read without extra coordination."""

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
                self._db.executescript(SCHEMA)
        except (sqlite3.Error, OSError) as exc:
            raise Unavailable(f"cannot open the bank database at {self.path}: {exc}") from exc
        self._lock = threading.Lock()

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            return sqlite3.connect(f"{self.path.as_uri()}?mode=ro&immutable=1", uri=True, check_same_thread=False,
                                   isolation_level=None)
        return sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, statements: list[tuple[str, tuple | list]]) -> None:
        """Run statements in one transaction; any storage failure leaves the database unchanged."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                for sql, args in statements:
                    if args and isinstance(args, list):
                        self._db.executemany(sql, args)
                    else:
                        self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except sqlite3.IntegrityError:
                self._db.execute("ROLLBACK")
                raise
            except (sqlite3.Error, OSError) as exc:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
                raise Unavailable(f"bank storage failed: {exc}") from exc

    def create_bank(self, record: BankRecord) -> None:
        try:
            self._write([(
                "INSERT INTO banks (name, kind, dim, params) VALUES (?, ?, ?, ?)",
                (record.name, record.kind, record.dim, json.dumps(record.params)),
            )])
        except sqlite3.IntegrityError as exc:
            if "UNIQUE" not in str(exc):
                raise
            raise AlreadyExists(f"bank '{record.name}' already exists", field="bank") from exc

    def delete_bank(self, name: str) -> None:
        self._write([("DELETE FROM banks WHERE name = ?", (name,))])

    def banks(self) -> list[BankRecord]:
        with self._lock:
            rows = self._db.execute("SELECT name, kind, dim, params FROM banks ORDER BY name").fetchall()
        return [BankRecord(name, kind, dim, json.loads(params)) for name, kind, dim, params in rows]

    def insert_patterns(self, bank: str, ids: list[str], vectors: np.ndarray) -> None:
        rows = [(bank, pid, np.ascontiguousarray(v, dtype=np.float32).tobytes()) for pid, v in zip(ids, vectors)]
        try:
            self._write([("INSERT INTO patterns (bank, id, vector) VALUES (?, ?, ?)", rows)])
        except sqlite3.IntegrityError as exc:
            raise NotFound(f"bank '{bank}' does not exist", field="bank") from exc

    def delete_pattern(self, bank: str, pattern_id: str) -> None:
        self._write([("DELETE FROM patterns WHERE bank = ? AND id = ?", (bank, pattern_id))])

    def patterns(self, bank: str, dim: int, chunk: int = 65536) -> Iterator[tuple[list[str], np.ndarray]]:
        """Stored patterns in insertion order, in chunks, so a large bank never sits in RAM twice.
        A separate read connection: WAL lets it scan while writers go on."""
        reader = self._connect()
        try:
            cursor = reader.execute("SELECT id, vector FROM patterns WHERE bank = ? ORDER BY seq", (bank,))
            while part := cursor.fetchmany(chunk):
                ids = [pid for pid, _ in part]
                blob = b"".join(vector for _, vector in part)
                yield ids, np.frombuffer(blob, dtype=np.float32).reshape(len(part), dim)
        finally:
            reader.close()

    def pattern(self, bank: str, pattern_id: str, dim: int) -> torch.Tensor:
        with self._lock:
            row = self._db.execute(
                "SELECT vector FROM patterns WHERE bank = ? AND id = ?", (bank, pattern_id)).fetchone()
        if row is None:
            raise NotFound(f"pattern '{pattern_id}' is not in bank '{bank}'", field="id")
        return torch.from_numpy(np.frombuffer(row[0], dtype=np.float32).reshape(dim).copy())
