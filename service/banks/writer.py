"""Bank writes committed straight to a shared store, with no serving state: what a gateway in front of
Triton replicas does with a PostgreSQL store, so that writes depend on PostgreSQL alone, never on a
serving replica. The replicas (Triton's associative_memory instances) follow the store's change log.

Requests are checked exactly as the registry checks them (the same functions), against the bank's
record in the store.
"""

from __future__ import annotations

import numpy as np

from service.banks.registry import BANK_NAME, STORED_BANK_NAME, BankInfo, checked_ids, checked_vectors
from service.banks.shards import ShardInfo
from service.banks.store import BankRecord, Store
from service.engines.memory import normalize_params
from service.errors import InvalidArgument, NotFound


class BankWriter:
    def __init__(self, store: Store):
        self.store = store

    def _record(self, name: str) -> BankRecord:
        record = self.store.bank(name)
        if record is None:
            raise NotFound(f"bank '{name}' does not exist", field="bank")
        return record

    def create(self, name: str, kind: str, dim: int, params: dict) -> BankInfo:
        if not STORED_BANK_NAME.fullmatch(name):
            raise InvalidArgument(f"bank name '{name}' must match {BANK_NAME.pattern}", field="bank")
        record = self.store.create_bank(BankRecord(name, kind, dim, normalize_params(kind, dim, params or {})))
        shards = [ShardInfo(shard=shard, count=0, replicas=[]) for shard in range(record.params.get("shards", 1))]
        return BankInfo(name=record.name, kind=record.kind, dim=record.dim, params=record.params, count=0, bytes=0,
                        version=0, checksum=f"{0:016x}", shards=shards)

    def delete(self, name: str) -> None:
        self._record(name)
        self.store.delete_bank(name)

    def store_patterns(self, name: str, patterns: np.ndarray, ids: list[str] | None) -> tuple[list[str], int, int]:
        """(ids in request order, bank count, bank version) once committed."""
        vectors = checked_vectors(self._record(name), patterns, "patterns")
        ids = checked_ids(ids, len(vectors))
        version, _, count = self.store.store_patterns(name, ids, vectors.numpy())
        return ids, count, version

    def delete_pattern(self, name: str, pattern_id: str) -> int:
        return self.store.delete_pattern(name, pattern_id)[0]
