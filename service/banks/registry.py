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

import hashlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import BaseModel, Field

from service import metrics
from service.banks.shards import EVERY_SHARD, Placement, ShardInfo, replicas_of, shard_of
from service.banks.store import BankRecord, Change, Store
from service.engines.memory import KINDS, make_engine, normalize_params
from service.engines.memory.base import MemoryEngine, Retrieval
from service.engines.memory.shards import Partial
from service.errors import Conflict, InvalidArgument, NotFound, Unavailable

log = logging.getLogger(__name__)

BANK_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# Stored names: "bank", or "tenant/bank" when API keys namespace banks per tenant.
STORED_BANK_NAME = re.compile(rf"(?:{BANK_NAME.pattern}/)?{BANK_NAME.pattern}")
PATTERN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
CHECKSUM_MODULUS = 2**64
AT_VERSION_POLL_S = 0.02


def pattern_digest(pattern_id: str, vector: np.ndarray) -> int:
    """64 bits of BLAKE2b over a pattern's id and float32 bytes; a bank's checksum is their sum mod 2⁶⁴,
    the same whatever order the patterns arrived or moved in."""
    digest = hashlib.blake2b(pattern_id.encode(), digest_size=8)
    digest.update(np.ascontiguousarray(vector, dtype=np.float32).tobytes())
    return int.from_bytes(digest.digest(), "little")


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
    version: int = 0  # committed writes this replica has applied
    checksum: str = ""  # of the patterns at that version (hex); equal on every replica at the same version
    shards: list[ShardInfo] = []  # their counts and who serves them (one shard for an unsharded bank)


class Agreement(BaseModel):
    mean_abs_energy_error: float
    max_abs_energy_error: float
    mean_gradient_cosine: float
    min_gradient_cosine: float


class Fidelity(BaseModel):
    """How well a DrDAM bank's random features approximate the exact rbf energy of its own patterns now."""

    version: int = Field(description="the bank's version the report was computed at")
    sample_size: int = Field(description="stored patterns sampled; as many noisy copies were evaluated too")
    noise: float = Field(description="the copies' Gaussian noise, relative to the patterns' RMS value")
    patterns: Agreement = Field(description="at the sampled patterns themselves")
    noisy: Agreement = Field(description="at their noisy copies")
    same_nearest: float = Field(description="fraction of noisy copies that DrDAM and exact retrieval bring nearest "
                                            "the same stored pattern")


@dataclass(frozen=True)
class DynamicsOptions:
    """Per-request knobs of the dynamics; requests batch together only when these are equal."""

    steps: int | None = None
    step_size: float | None = None
    tolerance: float | None = None
    trace: bool = False
    explain: bool = False


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
    # With explain, per step as the trace (NaN / None past a row's steps): the state, and the ids and
    # weights of the n stored patterns pulling it hardest.
    step_states: np.ndarray | None = None  # N×(S+1)×D float32
    top_ids: np.ndarray | None = None  # N×(S+1)×n object (str, or None past the steps)
    top_weights: np.ndarray | None = None  # N×(S+1)×n float32

    def __len__(self) -> int:
        return len(self.states)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MemoryResults):
            return NotImplemented
        arrays = ("states", "energy", "steps", "converged", "similarity", "trace", "step_states", "top_weights")
        return self.nearest == other.nearest and _same(self.top_ids, other.top_ids) and all(
            _same(getattr(self, name), getattr(other, name)) for name in arrays)

    def split(self, sizes: list[int]) -> list[MemoryResults]:
        """Consecutive shares of `sizes` rows: each request's answers in a batch."""
        bounds = np.cumsum([0, *sizes]).tolist()
        return [self.rows(start, stop) for start, stop in zip(bounds, bounds[1:])]

    def rows(self, start: int, stop: int) -> MemoryResults:
        """Rows start..stop-1: one request's share of a batch (views, no copies)."""
        def part(column: np.ndarray | None) -> np.ndarray | None:
            return None if column is None else column[start:stop]
        return MemoryResults(self.states[start:stop], self.energy[start:stop], self.steps[start:stop],
                             self.converged[start:stop], self.nearest[start:stop], self.similarity[start:stop],
                             part(self.trace), part(self.step_states), part(self.top_ids), part(self.top_weights))


class Partition:
    """One shard's serving state: an engine plus the shard's pattern ids in engine row order (kept in
    step with swap-removal)."""

    def __init__(self, engine: MemoryEngine):
        self.engine = engine
        self.ids: list[str] = []
        self.row_of: dict[str, int] = {}

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


class Bank:
    """A bank at `version`: its shards' partitions (one for an unsharded bank; over Triton replicas only
    those this replica serves, None for the others), every shard's count, and a checksum of the
    contents that depends neither on row order nor on which shards are held here."""

    def __init__(self, record: BankRecord, device: torch.device, placement: Placement = EVERY_SHARD):
        self.record = record
        shards = record.params.get("shards", 1)
        self.partitions = [Partition(make_engine(record.kind, record.dim, record.params, device))
                           if placement.holds(shard) else None for shard in range(shards)]
        self.counts = [0] * shards
        self.version = 0
        self.checksum = 0
        self.lock = threading.Lock()
        if shards > 1:  # the dynamics of the whole bank, over this process's partitions
            self.front = make_engine(record.kind, record.dim, record.params, device)
            self.front.fan_out(lambda states: [self.partition(shard).engine.partial(states)
                                               for shard in range(shards)])

    @property
    def sharded(self) -> bool:
        return len(self.partitions) > 1

    @property
    def count(self) -> int:
        return sum(self.counts)

    def partition(self, shard: int) -> Partition:
        partition = self.partitions[shard] if 0 <= shard < len(self.partitions) else None
        if partition is None:
            raise Unavailable(f"shard {shard} of bank '{self.record.name}' is not served by this replica")
        return partition

    def shard(self, pattern_id: str) -> int:
        return shard_of(pattern_id, len(self.partitions)) if self.sharded else 0

    def append(self, ids: list[str], vectors: torch.Tensor) -> None:
        shards = np.array([self.shard(pid) for pid in ids])
        for shard in np.unique(shards):
            rows = np.flatnonzero(shards == shard)
            if self.partitions[shard] is not None:
                self.partitions[shard].append([ids[i] for i in rows], vectors[torch.from_numpy(rows)])
            self.counts[shard] += len(rows)
        for pid, vector in zip(ids, vectors.numpy()):
            self.checksum = (self.checksum + pattern_digest(pid, vector)) % CHECKSUM_MODULUS

    def remove(self, pattern_id: str, vector: torch.Tensor) -> None:
        shard = self.shard(pattern_id)
        if self.partitions[shard] is not None:
            self.partitions[shard].remove(pattern_id, vector)
        self.counts[shard] -= 1
        self.checksum = (self.checksum - pattern_digest(pattern_id, vector.numpy())) % CHECKSUM_MODULUS

    def apply(self, change: Change) -> None:
        """The next change of the log; the caller holds the lock."""
        assert change.version == self.version + 1, f"change {change.version} applied at version {self.version}"
        vectors = _tensor(change.vectors)
        if change.op == "store":
            self.append(change.ids, vectors)
        else:
            self.remove(change.ids[0], vectors[0])
        self.version = change.version

    def run(self, queries: torch.Tensor, clamp: torch.Tensor | None, options: DynamicsOptions) -> MemoryResults:
        """The dynamics over the whole bank; the caller holds the lock."""
        engine = self.front if self.sharded else self.partition(0).engine
        out = engine.run(queries, clamp=clamp, steps=options.steps, step_size=options.step_size,
                         tolerance=options.tolerance, trace=options.trace, explain=options.explain)
        nearest = [self.partitions[shard].ids[row] if row >= 0 else None
                   for shard, row in zip(out.shard.tolist(), out.nearest.tolist())]
        # An explained bank has one shard (the engine refuses others), whose rows the top memories are.
        return results_of(out, nearest, self.partitions[0].ids if options.explain else None)

    def info(self, replicas: Sequence[str] = ("local",)) -> BankInfo:
        """`replicas`: the names of the replicas that serve shards, in the order placement indexes them."""
        r = self.record
        # An unsharded bank is one shard that every replica serves whole.
        placed = ((lambda shard: replicas_of(shard, len(replicas))) if self.sharded
                  else (lambda shard: range(len(replicas))))
        shards = [ShardInfo(shard=shard, count=count, replicas=[replicas[i] for i in placed(shard)])
                  for shard, count in enumerate(self.counts)]
        return BankInfo(name=r.name, kind=r.kind, dim=r.dim, params=r.params, count=self.count,
                        bytes=sum(p.engine.nbytes() for p in self.partitions if p is not None),
                        version=self.version, checksum=f"{self.checksum:016x}", shards=shards)


class BankRegistry:
    """The banks of a store, served from memory. Writes commit to the store first, then reach serving
    state in version order. Over a shared store (`store.shared`) other processes write too: `sync`
    (run by `follow`) brings every bank up to the store's version, and `at_version` one bank on
    demand, for read-your-writes."""

    def __init__(self, store: Store, device: str | torch.device = "cpu", placement: Placement = EVERY_SHARD):
        """`placement`: which shards of sharded banks this process serves (all of them by default)."""
        self.store = store
        self.device = torch.device(device)
        self.placement = placement
        self.replica_names = (["local"] if placement.count == 1
                              else [f"replica {index}" for index in range(placement.count)])
        self._banks: dict[str, Bank] = {}
        self._lock = threading.Lock()
        self.store_reachable = True  # as the last sync with a shared store found it
        for record in store.banks():
            self._banks[record.name] = self._load(record)

    def _load(self, record: BankRecord) -> Bank:
        """A bank from a consistent snapshot of the store, then its changes since."""
        bank = Bank(record, self.device, self.placement)
        bank.version, chunks = self.store.snapshot(record)
        for ids, matrix in chunks:
            bank.append(ids, _tensor(matrix))
        self._catch_up(bank)
        return bank

    def _catch_up(self, bank: Bank) -> None:
        """Apply the store's changes after the bank's version; the caller holds its lock (or owns it)."""
        for change in self.store.changes(bank.record, bank.version):
            bank.apply(change)
            if change.committed_at is not None:
                metrics.REPLICATION_LAG.observe(max(0.0, time.time() - change.committed_at))

    def _bank(self, name: str, adopt: bool = False) -> Bank:
        """The served bank; with `adopt` (callers off the event loop: it may ask the store), also one
        that another process created in a shared store since the last sync."""
        bank = self._banks.get(name)
        if bank is None and adopt and self.store.shared:
            bank = self._adopt(name)
        if bank is None:
            raise NotFound(f"bank '{name}' does not exist", field="bank")
        return bank

    def _adopt(self, name: str) -> Bank | None:
        record = self.store.bank(name)
        if record is None:
            return None
        with self._lock:
            if name not in self._banks or self._banks[name].record.uid != record.uid:
                self._banks[name] = self._load(record)
            return self._banks[name]

    def sync(self, notified: dict[str, int] | None = None) -> None:
        """Bring serving state to the store's: new and re-created banks loaded, deleted ones dropped,
        the others caught up; only the `notified` banks when given ({bank: version}, 0 = created or
        deleted), of which those already served at that version need nothing."""
        if notified is None:
            records = {record.name: record for record in self.store.banks()}
            gone = [name for name in self._banks if name not in records]
        else:
            found = {name: self.store.bank(name) for name, version in notified.items()
                     if version == 0 or name not in self._banks or self._banks[name].version < version}
            records = {name: record for name, record in found.items() if record is not None}
            gone = [name for name, record in found.items() if record is None]
        with self._lock:
            for name in gone + [name for name, record in records.items()
                                if name in self._banks and self._banks[name].record.uid != record.uid]:
                self._banks.pop(name, None)
            for name, record in records.items():
                if name not in self._banks:
                    self._banks[name] = self._load(record)
        for name, record in records.items():
            bank = self._banks.get(name)
            if bank is not None and bank.version < record.version:
                with bank.lock:
                    self._catch_up(bank)

    def follow(self, stop: threading.Event, poll: float = 1.0) -> None:
        """Keep in step with a shared store until `stop` is set: wake on its notifications, and poll
        every `poll` seconds in case one was lost. A store that cannot answer is tried again later."""
        while not stop.is_set():
            notified = self.store.wait_for_changes(poll)
            if stop.is_set():
                return
            try:
                self.sync(notified)
            except Unavailable as exc:
                if self.store_reachable:
                    log.warning("bank replica cannot reach its store: %s", exc.message)
                self.store_reachable = False
                stop.wait(poll)
            else:
                self.store_reachable = True

    def __contains__(self, name: str) -> bool:
        return name in self._banks

    def version(self, name: str) -> int:
        return self._bank(name).version

    def at_version(self, name: str, min_version: int, timeout: float = 0.0) -> None:
        """Return once serving state of the bank is at `min_version` or later, catching up from the
        store while it is behind, for at most `timeout` seconds; then Unavailable (503) naming the lag.
        A version the store has not committed is the request's error (422), not a lag."""
        deadline = time.monotonic() + timeout
        bank = self._bank(name, adopt=True)
        while bank.version < min_version:
            with bank.lock:
                self._catch_up(bank)
            if bank.version >= min_version:
                return
            committed = self.store.bank(name)
            if committed is not None and committed.uid == bank.record.uid and committed.version < min_version:
                raise InvalidArgument(f"min_version {min_version} is ahead of bank '{name}', whose last committed "
                                      f"write is version {committed.version}", field="min_version")
            if time.monotonic() >= deadline:
                raise Unavailable(f"bank '{name}' is at version {bank.version} here, {min_version - bank.version} "
                                  f"behind the requested min_version {min_version}", retry_after=1.0)
            time.sleep(AT_VERSION_POLL_S)

    def create(self, name: str, kind: str, dim: int, params: dict) -> BankInfo:
        if not STORED_BANK_NAME.fullmatch(name):
            raise InvalidArgument(f"bank name '{name}' must match {BANK_NAME.pattern}", field="bank")
        params = normalize_params(kind, dim, params or {})
        with self._lock:
            bank = Bank(BankRecord(name, kind, dim, params), self.device, self.placement)
            bank.record = self.store.create_bank(bank.record)
            self._banks[name] = bank
        return bank.info(self.replica_names)

    def list(self) -> list[BankInfo]:
        return [bank.info(self.replica_names) for _, bank in sorted(self._banks.items())]

    def info(self, name: str) -> BankInfo:
        return self._bank(name).info(self.replica_names)

    def delete(self, name: str) -> None:
        self._bank(name, adopt=True)  # NotFound unless the store has it
        with self._lock:
            bank = self._bank(name)
            with bank.lock:
                self.store.delete_bank(name)
                self._banks.pop(name, None)

    def store_patterns(self, name: str, patterns: np.ndarray, ids: list[str] | None) -> tuple[list[str], int, int]:
        """Store K patterns; an id already stored with the same vector is a no-op (idempotent retry),
        with a different vector a conflict. Returns (ids in request order, bank count, bank version)."""
        bank = self._bank(name, adopt=True)
        vectors = checked_vectors(bank.record, patterns, "patterns")
        ids = checked_ids(ids, len(vectors))
        version, fresh, _ = self.store.store_patterns(name, ids, vectors.numpy())
        with bank.lock:
            change = Change(version, "store", [ids[i] for i in fresh], vectors[fresh].numpy()) if fresh else None
            self._reach(bank, version, change)
            return list(ids), bank.count, bank.version

    def delete_pattern(self, name: str, pattern_id: str) -> int:
        """Returns the bank's version after the deletion."""
        bank = self._bank(name, adopt=True)
        version, vector = self.store.delete_pattern(name, pattern_id)
        with bank.lock:
            self._reach(bank, version, Change(version, "delete", [pattern_id], vector[None]))
            return bank.version

    def _reach(self, bank: Bank, version: int, change: Change | None) -> None:
        """After this process committed `change` at `version`: apply it directly when it is the next
        one, else catch up from the log (another writer committed in between). Holds the bank lock."""
        if bank.version >= version:
            return
        if change is not None and change.version == bank.version + 1:
            bank.apply(change)
        else:
            self._catch_up(bank)

    def check_queries(self, name: str, queries: np.ndarray, clamp: np.ndarray | None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validate one request's queries (and clamp mask) against its bank; errors name the field."""
        return checked_queries(self._bank(name).record, queries, clamp)

    def run_batch(self, name: str, parts: list[tuple[torch.Tensor, torch.Tensor | None]],
                  options: DynamicsOptions) -> list[MemoryResults]:
        """Several checked requests on one bank with the same options: ONE batched engine call,
        answered as one MemoryResults per request."""
        bank = self._bank(name)
        x, mask = stacked(parts)
        with bank.lock:
            results = bank.run(x, mask, options)
        return results.split([len(queries) for queries, _ in parts])


    def fidelity(self, name: str, sample_size: int, noise: float) -> Fidelity:
        """DrDAM against exact rbf on up to `sample_size` of the bank's patterns (a fixed random choice)
        and their noisy copies; 409 when the bank does not keep its patterns."""
        bank = self._bank(name)
        if bank.record.kind != "drdam":
            raise InvalidArgument(f"fidelity compares DrDAM with exact rbf: bank '{name}' is {bank.record.kind}",
                                  field="bank")
        with bank.lock:
            engine = bank.partition(0).engine
            if not engine.keeps_patterns:
                raise Conflict(f"bank '{name}' does not keep its patterns (params.keep_patterns false): "
                               "the exact energy needs them", field="bank")
            if engine.count == 0:
                raise Conflict(f"bank '{name}' has no stored patterns", field="bank")
            generator = torch.Generator().manual_seed(0)  # the same sample on every call and replica
            rows = torch.randperm(engine.count, generator=generator)[:sample_size]
            sample = engine.patterns[rows.to(engine.device)].float()
            scale = noise * sample.square().mean().sqrt()
            noisy = sample + scale * torch.randn(sample.shape, generator=generator).to(sample.device)
            same = engine.same_retrieval(noisy)
            return Fidelity(version=bank.version, sample_size=len(rows), noise=noise,
                            patterns=Agreement(**vars(engine.agreement(sample))),
                            noisy=Agreement(**vars(engine.agreement(noisy))),
                            same_nearest=same.float().mean().item())

    def partial_batch(self, name: str, shard: int, shards: int, parts: list[torch.Tensor]
                      ) -> list[tuple[Partial, list[str | None]]]:
        """Shard `shard`'s share of one evaluation of a sharded bank's dynamics (what a gateway fanning
        the bank out asks each shard) at the states of several checked requests, in ONE engine call:
        per request its partial and the id of each state's nearest pattern in the shard. `shards` is
        the shard count the asker believes the bank has."""
        bank = self._bank(name)
        if len(bank.partitions) != shards:
            raise InvalidArgument(f"bank '{name}' has {len(bank.partitions)} shards, not {shards}", field="shards")
        with bank.lock:
            partition = bank.partition(shard)
            partial = partition.engine.partial(torch.cat(parts))
            ids = [partition.ids[row] if row >= 0 else None for row in partial.nearest.row.tolist()]
        split, start = [], 0
        for states in parts:
            split.append((partial.rows(start, start + len(states)), ids[start:start + len(states)]))
            start += len(states)
        return split

def checked_vectors(record: BankRecord, values: np.ndarray, field: str, binary_values: bool = True) -> torch.Tensor:
    """A request's K×D vectors for the bank: its dim, and ±1 values for the binary kinds (a completion's
    cues may be anything: only their clamped entries count)."""
    x = np.asarray(values, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise InvalidArgument(f"{field} must be a non-empty list of vectors", field=field)
    if x.shape[1] != record.dim:
        raise InvalidArgument(f"{field} vectors have dimension {x.shape[1]}, bank '{record.name}' has dim {record.dim}",
                              field=field)
    tensor = _tensor(x)
    if binary_values:
        KINDS[record.kind].check_values(tensor, field)
    return tensor


def checked_queries(record: BankRecord, queries: np.ndarray, clamp: np.ndarray | None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A retrieval's (or completion's) queries and clamp mask, checked against the bank."""
    x = checked_vectors(record, queries, "queries", binary_values=clamp is None)
    if clamp is None:
        return x, None
    mask = np.asarray(clamp)
    if mask.shape != tuple(x.shape) or mask.dtype != np.bool_:
        raise InvalidArgument(f"mask must be booleans of the same shape as queries {tuple(x.shape)}", field="mask")
    return x, _tensor(mask)


def stacked(parts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Several checked requests' queries and masks as one batch (no mask when none has one)."""
    x = torch.cat([queries for queries, _ in parts])
    if all(mask is None for _, mask in parts):
        return x, None
    return x, torch.cat([m if m is not None else torch.zeros_like(q, dtype=torch.bool) for q, m in parts])


def checked_ids(ids: list[str] | None, count: int) -> list[str]:
    """The ids of `count` patterns to store: given (valid, unique) or generated."""
    if ids is None:
        return [uuid.uuid4().hex for _ in range(count)]
    if len(ids) != count:
        raise InvalidArgument(f"ids has {len(ids)} entries for {count} patterns", field="ids")
    for i, pid in enumerate(ids):
        if not isinstance(pid, str) or not PATTERN_ID.fullmatch(pid):
            raise InvalidArgument(f"ids[{i}] must match {PATTERN_ID.pattern}", field=f"ids[{i}]")
    if len(set(ids)) != len(ids):
        raise InvalidArgument("ids must be unique within a request", field="ids")
    return list(ids)


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing `array`'s memory; a read-only array (a Triton input) is copied once."""
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def results_of(out: Retrieval, nearest: list[str | None], ids: list[str] | None = None) -> MemoryResults:
    """The engine's CPU tensors as numpy views, with the ids of the nearest patterns (and with an
    explanation, `ids` of the bank's rows for its top memories)."""
    results = MemoryResults(states=out.states.numpy(), energy=out.energy.numpy(), steps=out.steps.numpy(),
                            converged=out.converged.numpy(), nearest=nearest, similarity=out.similarity.numpy(),
                            trace=None if out.trace is None else out.trace.numpy())
    if out.explanation is not None:
        names = np.array([*ids, None], dtype=np.object_)  # row −1 (past a query's steps) reads None
        results.step_states = out.explanation.states.numpy()
        results.top_ids = names[out.explanation.top_rows.numpy()]
        results.top_weights = out.explanation.top_weights.numpy()
    return results
