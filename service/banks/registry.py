"""Named memory banks: engine serving state in RAM (or GPU), durable copy in the store.

Both backends use this class: the embedded backend in the gateway process, the Triton
`associative_memory` model inside Triton. Every write is committed to the store before it touches
serving state, so what a client saw acknowledged is what a restart rebuilds.

Results leave as columns (`MemoryResults`: a states matrix plus one array per field) and stay
columns across the Triton wire; only the API edge that serialises them makes Python lists.
Request values were checked for finiteness and rectangular shape at that edge; this module checks
what only the bank knows (its dim, its kind's values) once, in `check_queries` and `store_patterns`.
"""

from __future__ import annotations

import re
import threading
import uuid
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel

from service.banks.store import BankRecord, SQLiteStore
from service.engines.memory import make_engine, normalize_params
from service.engines.memory.base import MemoryEngine, Retrieval
from service.errors import Conflict, InvalidArgument, NotFound

BANK_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# Stored names: "bank", or "tenant/bank" when API keys namespace banks per tenant.
STORED_BANK_NAME = re.compile(rf"(?:{BANK_NAME.pattern}/)?{BANK_NAME.pattern}")
PATTERN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


def check_bank_name(name: str) -> None:
    if not BANK_NAME.fullmatch(name):
        raise InvalidArgument(f"bank name '{name}' must match {BANK_NAME.pattern}", field="bank")


class BankInfo(BaseModel):
    name: str
    kind: str
    dim: int
    params: dict
    count: int
    bytes: int


@dataclass(frozen=True)
class DynamicsOptions:
    """Per-request knobs of the dynamics; requests batch together only when these are equal."""

    steps: int | None = None
    step_size: float | None = None
    tolerance: float | None = None
    trace: bool = False


@dataclass(eq=False)
class MemoryResults:
    """The answers to N queries as columns: row i answers query i. Two are equal when every column is
    (bit for bit, NaN included): what the same query gives over either backend."""

    states: np.ndarray  # N×D float32 final states
    energy: np.ndarray  # N float32
    steps: np.ndarray  # N int64 updates applied
    converged: np.ndarray  # N bool
    nearest: list[str | None]  # id of the most similar stored pattern (None: the kind keeps none)
    similarity: np.ndarray  # N float32 cosine similarity to it
    trace: np.ndarray | None  # N×(S+1) float32 energies, NaN past row i's steps[i]+1 entries

    def __len__(self) -> int:
        return len(self.states)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MemoryResults):
            return NotImplemented
        arrays = ("states", "energy", "steps", "converged", "similarity", "trace")
        return self.nearest == other.nearest and all(
            _same(getattr(self, name), getattr(other, name)) for name in arrays)

    def rows(self, start: int, stop: int) -> MemoryResults:
        """Rows start..stop-1: one request's share of a batch (views, no copies)."""
        return MemoryResults(self.states[start:stop], self.energy[start:stop], self.steps[start:stop],
                             self.converged[start:stop], self.nearest[start:stop], self.similarity[start:stop],
                             None if self.trace is None else self.trace[start:stop])


class Bank:
    """An engine plus the pattern ids in engine row order (kept in step with swap-removal)."""

    def __init__(self, record: BankRecord, engine: MemoryEngine):
        self.record = record
        self.engine = engine
        self.ids: list[str] = []
        self.row_of: dict[str, int] = {}
        self.lock = threading.Lock()

    def append(self, ids: list[str], vectors: torch.Tensor) -> None:
        self.engine.add(vectors)
        for pid in ids:
            self.row_of[pid] = len(self.ids)
            self.ids.append(pid)

    def remove(self, pattern_id: str, vector: torch.Tensor) -> None:
        row = self.row_of.pop(pattern_id)
        self.engine.remove(row, vector)
        last = self.ids.pop()
        if last != pattern_id:
            self.ids[row] = last
            self.row_of[last] = row

    def info(self) -> BankInfo:
        r = self.record
        return BankInfo(name=r.name, kind=r.kind, dim=r.dim, params=r.params, count=self.engine.count,
                        bytes=self.engine.nbytes())


class BankRegistry:
    def __init__(self, store: SQLiteStore, device: str | torch.device = "cpu"):
        self.store = store
        self.device = torch.device(device)
        self._banks: dict[str, Bank] = {}
        self._lock = threading.Lock()
        for record in store.banks():
            bank = Bank(record, make_engine(record.kind, record.dim, record.params, self.device))
            for ids, matrix in store.patterns(record.name, record.dim):
                bank.append(ids, torch.from_numpy(matrix.copy()))
            self._banks[record.name] = bank

    def _bank(self, name: str) -> Bank:
        bank = self._banks.get(name)
        if bank is None:
            raise NotFound(f"bank '{name}' does not exist", field="bank")
        return bank

    def create(self, name: str, kind: str, dim: int, params: dict) -> BankInfo:
        if not STORED_BANK_NAME.fullmatch(name):
            raise InvalidArgument(f"bank name '{name}' must match {BANK_NAME.pattern}", field="bank")
        params = normalize_params(kind, dim, params or {})
        record = BankRecord(name, kind, dim, params)
        with self._lock:
            engine = make_engine(kind, dim, params, self.device)
            self.store.create_bank(record)
            self._banks[name] = bank = Bank(record, engine)
        return bank.info()

    def list(self) -> list[BankInfo]:
        return [bank.info() for _, bank in sorted(self._banks.items())]

    def info(self, name: str) -> BankInfo:
        return self._bank(name).info()

    def delete(self, name: str) -> None:
        with self._lock:
            bank = self._bank(name)
            with bank.lock:
                self.store.delete_bank(name)
                del self._banks[name]

    def store_patterns(self, name: str, patterns: np.ndarray, ids: list[str] | None) -> tuple[list[str], int]:
        """Store K patterns; an id already stored with the same vector is a no-op (idempotent retry),
        with a different vector a conflict. Returns (ids in request order, bank count)."""
        bank = self._bank(name)
        vectors = self._vectors(bank, patterns, "patterns")
        if ids is None:
            ids = [uuid.uuid4().hex for _ in range(len(vectors))]
        elif len(ids) != len(vectors):
            raise InvalidArgument(f"ids has {len(ids)} entries for {len(vectors)} patterns", field="ids")
        for i, pid in enumerate(ids):
            if not isinstance(pid, str) or not PATTERN_ID.fullmatch(pid):
                raise InvalidArgument(f"ids[{i}] must match {PATTERN_ID.pattern}", field=f"ids[{i}]")
        if len(set(ids)) != len(ids):
            raise InvalidArgument("ids must be unique within a request", field="ids")
        with bank.lock:
            if self._banks.get(name) is not bank:
                raise NotFound(f"bank '{name}' does not exist", field="bank")
            fresh = []
            for i, pid in enumerate(ids):
                row = bank.row_of.get(pid)
                if row is None:
                    fresh.append(i)
                elif not torch.equal(self._stored_vector(bank, pid), vectors[i]):
                    raise Conflict(f"id '{pid}' is already stored with a different pattern", field=f"ids[{i}]")
            if fresh:
                new_ids = [ids[i] for i in fresh]
                new_vectors = vectors[fresh]
                self.store.insert_patterns(name, new_ids, new_vectors.numpy())
                bank.append(new_ids, new_vectors)
            return list(ids), bank.engine.count

    def delete_pattern(self, name: str, pattern_id: str) -> None:
        bank = self._bank(name)
        with bank.lock:
            if pattern_id not in bank.row_of:
                raise NotFound(f"pattern '{pattern_id}' is not in bank '{name}'", field="id")
            vector = self._stored_vector(bank, pattern_id)
            self.store.delete_pattern(name, pattern_id)
            bank.remove(pattern_id, vector)

    def check_queries(self, name: str, queries: np.ndarray, clamp: np.ndarray | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validate one request's queries (and clamp mask) against its bank; errors name the field."""
        bank = self._bank(name)
        x = self._vectors(bank, queries, "queries", binary_values=clamp is None)
        if clamp is None:
            return x, None
        mask = np.asarray(clamp)
        if mask.shape != tuple(x.shape) or mask.dtype != np.bool_:
            raise InvalidArgument(f"mask must be booleans of the same shape as queries {tuple(x.shape)}",
                                  field="mask")
        return x, _tensor(mask)

    def run_batch(self, name: str, parts: list[tuple[torch.Tensor, torch.Tensor | None]],
                  options: DynamicsOptions) -> list[MemoryResults]:
        """Several checked requests on one bank with the same options: ONE batched engine call,
        answered as one MemoryResults per request."""
        bank = self._bank(name)
        x = torch.cat([queries for queries, _ in parts])
        clamped = any(mask is not None for _, mask in parts)
        mask = torch.cat([m if m is not None else torch.zeros_like(q, dtype=torch.bool) for q, m in parts]) \
            if clamped else None
        with bank.lock:
            out = bank.engine.run(x, clamp=mask, steps=options.steps, step_size=options.step_size,
                                  tolerance=options.tolerance, trace=options.trace)
            nearest = [bank.ids[i] if i >= 0 else None for i in out.nearest.tolist()]
        results = _columns(out, nearest)
        split, start = [], 0
        for queries, _ in parts:
            split.append(results.rows(start, start + len(queries)))
            start += len(queries)
        return split

    def _vectors(self, bank: Bank, values: np.ndarray, field_name: str, binary_values: bool = True) -> torch.Tensor:
        x = np.asarray(values, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] == 0:
            raise InvalidArgument(f"{field_name} must be a non-empty list of vectors", field=field_name)
        if x.shape[1] != bank.record.dim:
            raise InvalidArgument(
                f"{field_name} vectors have dimension {x.shape[1]}, bank '{bank.record.name}' has dim {bank.record.dim}",
                field=field_name)
        tensor = _tensor(x)
        if binary_values:
            bank.engine.check_values(tensor, field_name)
        return tensor

    def _stored_vector(self, bank: Bank, pattern_id: str) -> torch.Tensor:
        return self.store.pattern(bank.record.name, pattern_id, bank.record.dim)


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing `array`'s memory; a read-only array (a Triton input) is copied once."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def _columns(out: Retrieval, nearest: list[str | None]) -> MemoryResults:
    """The engine's CPU tensors as numpy views."""
    return MemoryResults(states=out.states.numpy(), energy=out.energy.numpy(), steps=out.steps.numpy(),
                         converged=out.converged.numpy(), nearest=nearest, similarity=out.similarity.numpy(),
                         trace=None if out.trace is None else out.trace.numpy())
