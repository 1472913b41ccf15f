"""What every memory kind shares: pattern storage, the retrieval driver and parameter checks.

A kind supplies its energy and its dynamics (`_descend`); this module turns queries into
starting states, applies the clamp mask, runs the dynamics and explains the answer with the
nearest stored pattern. Two families of dynamics are written once here:

- `BinaryMemory`: ±1 states, asynchronous sweeps over the units (classical, dense);
- `GradientMemory`: v ← v − α ∇E by autograd, with per-query backtracking so that the
  energy never increases (rbf, drdam).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from service.errors import Conflict, InvalidArgument

MAX_DIM = 65_536
# Halving the step 30 times shrinks it by ~1e-9: past that the energy is flat to float32.
MAX_HALVINGS = 30
# Halvings a line search tries in one evaluation once the full step was refused.
PROBES = 8
# Stored patterns an explained step lists, the strongest first.
TOP_MEMORIES = 5


@dataclass
class Retrieval:
    """One batched call's results, all tensors on CPU."""

    states: Tensor  # B×D float32 final states
    energy: Tensor  # B float32 final energy
    steps: Tensor  # B int64 updates applied
    converged: Tensor  # B bool
    nearest: Tensor  # B int64 row of the most similar stored pattern (-1 if unknown), in shard `shard`
    shard: Tensor  # B int64 (0 for an unsharded bank)
    similarity: Tensor  # B float32 cosine similarity to it (nan if unknown)
    trace: Tensor | None  # B×(S+1) energies at the start and after every step, NaN once a query stopped
    explanation: Explanation | None = None


@dataclass
class Explanation:
    """With explain: every step's state and the stored patterns pulling it, aligned with the trace
    (entry 0 the start; NaN states and row −1 once a query stopped)."""

    states: Tensor  # B×(S+1)×D float32
    top_rows: Tensor  # B×(S+1)×n int64 rows (in the bank's only shard) of the n strongest patterns, −1 for none
    top_weights: Tensor  # B×(S+1)×n float32 their weights (see MemoryEngine.memory_weights)


@dataclass
class Nearest:
    """Per query, the stored pattern most similar to its state: `best` = max_μ ξ_μ·v/‖ξ_μ‖, found in
    shard `shard` at row `row` of that shard (shard 0 for an unsharded bank)."""

    best: Tensor  # B float64, −inf where no pattern was seen
    shard: Tensor  # B int64
    row: Tensor  # B int64

    def where(self, take: Tensor, other: Nearest) -> Nearest:
        """Rows from `other` where `take` (B bool), from self elsewhere."""
        return Nearest(torch.where(take, other.best, self.best), torch.where(take, other.shard, self.shard),
                       torch.where(take, other.row, self.row))

    def index(self, rows: Tensor) -> Nearest:
        return Nearest(self.best[rows], self.shard[rows], self.row[rows])


@dataclass
class Evaluation:
    """Energy and gradient at B states (unmasked), and the nearest pattern when the kind finds it on
    the way (its dynamics already compute every overlap)."""

    energy: Tensor
    gradient: Tensor
    nearest: Nearest | None = None

    def index(self, rows: Tensor) -> Evaluation:
        return Evaluation(self.energy[rows], self.gradient[rows],
                          None if self.nearest is None else self.nearest.index(rows))


@dataclass
class Descent:
    """Outcome of a kind's dynamics, still on the engine's device."""

    states: Tensor
    energy: Tensor
    steps: Tensor
    converged: Tensor
    trace: list[Tensor]  # B energies at the start and after each round of updates
    path: list[Tensor] | None  # with explain: B×D states at the start and after each round, as the trace
    overlaps: Tensor | None = None  # Ξv at the final states when the dynamics already hold it
    nearest: Nearest | None = None  # or the nearest pattern itself


class MemoryEngine:
    """Stored patterns of one bank and the dynamics that retrieve them.

    Patterns live in a preallocated K×D tensor grown by doubling; removal swaps the last
    row into the freed one, so row indices stay dense (the caller mirrors the swap).
    """

    kind: str
    binary: bool = False
    default_steps: int = 100
    default_step_size: float = 1.0
    default_tolerance: float = 1e-4
    dtype: torch.dtype = torch.float32  # of the stored patterns (states stay float32)

    def __init__(self, dim: int, params: dict, device: str | torch.device = "cpu"):
        self.dim = dim
        self.params = dict(params)
        self.device = torch.device(device)
        self.keeps_patterns = True
        self._count = 0
        self._storage = torch.empty(0, dim, device=self.device, dtype=self.dtype)
        self._norms = torch.empty(0, device=self.device, dtype=self.dtype)

    # ----- parameters -------------------------------------------------------------------

    @classmethod
    def normalize_params(cls, dim: int, params: dict) -> dict:
        """Defaults filled in, types and ranges checked; raises InvalidArgument."""
        raise NotImplementedError

    # ----- storage ----------------------------------------------------------------------

    @property
    def count(self) -> int:
        return self._count

    @property
    def patterns(self) -> Tensor:
        """The stored patterns, K×D, a view of the storage."""
        return self._storage[: self._count]

    @property
    def pattern_norms(self) -> Tensor:
        return self._norms[: self._count]

    def nbytes(self) -> int:
        """Bytes of serving state: every tensor the engine holds."""
        return sum(tensor.nbytes for tensor in self._state_tensors())

    def _state_tensors(self) -> list[Tensor]:
        return [self._storage, self._norms] if self.keeps_patterns else []

    def add(self, patterns: Tensor) -> None:
        """Append K×D patterns as rows count..count+K-1."""
        self.check_values(patterns, "patterns")
        patterns = patterns.to(self.device, torch.float32)
        if self.keeps_patterns:
            self._reserve(self._count + patterns.shape[0])
            rows = slice(self._count, self._count + patterns.shape[0])
            self._storage[rows] = patterns
            self._norms[rows] = torch.linalg.vector_norm(self._storage[rows], dim=-1)
        self._count += patterns.shape[0]
        self._stored(patterns)

    def remove(self, row: int, pattern: Tensor) -> None:
        """Forget row `row`: the last row moves into its place.

        `pattern` is the stored vector; kinds that keep their patterns use their own copy.
        """
        if not 0 <= row < self._count:
            raise IndexError(f"row {row} out of range for {self._count} stored patterns")
        last = self._count - 1
        if self.keeps_patterns:
            removed = self._storage[row].clone()
            self._storage[row] = self._storage[last]
            self._norms[row] = self._norms[last]
        else:
            removed = pattern.reshape(self.dim).to(self.device, torch.float32)
        self._count = last
        self._forgotten(removed)

    def _reserve(self, needed: int) -> None:
        capacity = self._storage.shape[0]
        if needed <= capacity:
            return
        capacity = max(needed, 2 * capacity, 16)
        with torch.inference_mode(False):  # autograd must be able to use the storage later
            storage = torch.empty(capacity, self.dim, device=self.device, dtype=self.dtype)
            norms = torch.empty(capacity, device=self.device, dtype=self.dtype)
        storage[: self._count] = self.patterns
        norms[: self._count] = self.pattern_norms
        self._storage, self._norms = storage, norms

    def _stored(self, patterns: Tensor) -> None:
        """Update state derived from the patterns after `patterns` were appended."""

    def _forgotten(self, pattern: Tensor) -> None:
        """Update state derived from the patterns after `pattern` was removed."""

    # ----- validation -------------------------------------------------------------------

    @classmethod
    def check_values(cls, x: Tensor, field: str) -> None:
        """Raise InvalidArgument(field=field) unless this kind accepts the values of the B×D batch x.

        Shape and finiteness are the caller's to check (the API edge and the bank do, once)."""
        if cls.binary and not ((x == 1) | (x == -1)).all():
            raise InvalidArgument(f"kind '{cls.kind}' holds ±1 vectors: every value must be -1 or 1", field=field)

    def _require_patterns(self) -> None:
        if self._count == 0:
            raise Conflict("bank has no stored patterns")

    # ----- energy and retrieval ---------------------------------------------------------

    def energy(self, states: Tensor) -> Tensor:
        """Energy of each of B states (CPU float32)."""
        self._require_patterns()
        self.check_values(states, "states")
        return self._energy(states.to(self.device, torch.float32)).float().cpu()

    def _energy(self, states: Tensor) -> Tensor:
        raise NotImplementedError

    def run(
        self,
        queries: Tensor,
        *,
        clamp: Tensor | None = None,
        steps: int | None = None,
        step_size: float | None = None,
        tolerance: float | None = None,
        trace: bool = False,
        explain: bool = False,
    ) -> Retrieval:
        """Run the dynamics from B×D queries; `clamp` (B×D bool, True = known) pins entries. `explain`
        records every step's state and top memories (and implies `trace`)."""
        self._require_patterns()
        if explain:
            self._check_explainable()
        states = queries.to(self.device, torch.float32).clone()
        if self.binary:
            states = torch.where(states >= 0, 1.0, -1.0)
        free = self._free_mask(clamp, states.shape)
        descent = self._descend(
            states,
            free,
            self._checked_steps(steps),
            self._checked_step_size(step_size),
            self._checked_tolerance(tolerance),
            [] if explain else None,
        )
        nearest = descent.nearest or self._nearest(descent.states, descent.overlaps)
        state_norms = torch.linalg.vector_norm(descent.states, dim=-1).double()
        # Rounding can push a cosine just past ±1.
        similarity = (nearest.best / state_norms.clamp_min(torch.finfo(torch.float32).tiny)).clamp(-1.0, 1.0)
        return Retrieval(
            states=descent.states.float().cpu(),
            energy=descent.energy.float().cpu(),
            steps=descent.steps.to(torch.int64).cpu(),
            converged=descent.converged.cpu(),
            nearest=nearest.row.cpu(),
            shard=nearest.shard.cpu(),
            similarity=similarity.float().cpu(),
            trace=_padded(descent.trace, descent.steps) if trace or explain else None,
            explanation=self._explained(descent.path, descent.steps) if explain else None,
        )

    def _descend(self, states: Tensor, free: Tensor, steps: int, step_size: float, tolerance: float,
                 path: list[Tensor] | None) -> Descent:
        """Run at most `steps` updates; only entries where `free` is True may change. With `path` (a
        list), a copy of the states at the start and after each round is appended to it."""
        raise NotImplementedError

    # ----- explanation ------------------------------------------------------------------

    def _check_explainable(self) -> None:
        """Raise InvalidArgument(field="explain") where this engine cannot explain its steps."""

    def memory_weights(self, states: Tensor) -> Tensor | None:
        """How strongly each stored pattern pulls each of B states (B×K), or None where the kind keeps
        no patterns: the overlap ξ·v/D for the binary kinds, the softmax weight for the log-sum-exp
        kinds, the share of ⟨φ(v), T⟩ for DrDAM."""
        raise NotImplementedError

    def _explained(self, path: list[Tensor], steps: Tensor) -> Explanation:
        states = torch.stack(path, dim=1).float()  # B×(S+1)×D
        batch, length = states.shape[:2]
        weights = self.memory_weights(states.reshape(batch * length, self.dim))
        top = min(TOP_MEMORIES, self.count if weights is not None else 0)
        if top:
            top_weights, top_rows = weights.float().topk(top, dim=-1)
        else:
            top_weights = torch.empty(batch * length, 0, device=self.device)
            top_rows = torch.empty(batch * length, 0, dtype=torch.int64, device=self.device)
        stopped = (torch.arange(length, device=self.device)[None, :] > steps[:, None])[..., None]
        return Explanation(states=states.masked_fill(stopped, math.nan).cpu(),
                           top_rows=top_rows.reshape(batch, length, top).masked_fill(stopped, -1).cpu(),
                           top_weights=top_weights.reshape(batch, length, top).masked_fill(stopped, math.nan).cpu())

    def _bookkeeping(self, batch: int) -> tuple[Tensor, Tensor, Tensor]:
        """Per query at the start of a descent: still moving (all), converged (none), steps taken (0)."""
        active = torch.ones(batch, dtype=torch.bool, device=self.device)
        return active, torch.zeros_like(active), torch.zeros(batch, dtype=torch.int64, device=self.device)

    def _nearest(self, states: Tensor, overlaps: Tensor | None) -> Nearest:
        batch = states.shape[0]
        if not self.keeps_patterns:
            return Nearest(torch.full((batch,), math.nan, dtype=torch.float64, device=self.device),
                           torch.zeros(batch, dtype=torch.int64, device=self.device),
                           torch.full((batch,), -1, dtype=torch.int64, device=self.device))
        if overlaps is None:
            overlaps = states.to(self.dtype) @ self.patterns.T
        return self._best_of(overlaps)

    def _best_of(self, overlaps: Tensor) -> Nearest:
        """The nearest pattern from the overlaps Ξv (B×K)."""
        norms = self.pattern_norms.to(overlaps.dtype).clamp_min(torch.finfo(overlaps.dtype).tiny)
        best, row = (overlaps / norms).max(dim=-1)
        return Nearest(best.double(), torch.zeros_like(row), row)

    # ----- request checks ---------------------------------------------------------------

    def _free_mask(self, clamp: Tensor | None, shape: torch.Size) -> Tensor:
        if clamp is None:
            return torch.ones(shape, dtype=torch.bool, device=self.device)
        return ~clamp.to(self.device, torch.bool)

    def _checked_steps(self, steps: int | None) -> int:
        if steps is None:
            return self.default_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise InvalidArgument("steps must be an integer >= 0", field="steps")
        return steps

    def _checked_step_size(self, step_size: float | None) -> float:
        if step_size is None:
            return self.default_step_size
        if not math.isfinite(step_size) or step_size <= 0:
            raise InvalidArgument("step_size must be a finite number > 0", field="step_size")
        return float(step_size)

    def _checked_tolerance(self, tolerance: float | None) -> float:
        if tolerance is None:
            return self.default_tolerance
        if not math.isfinite(tolerance) or tolerance < 0:
            raise InvalidArgument("tolerance must be a finite number >= 0", field="tolerance")
        return float(tolerance)


def _padded(trace: list[Tensor], steps: Tensor) -> Tensor:
    """Queries step in lockstep until they stop, so query i's trace is the first steps_i+1 entries of
    row i; the entries after them are NaN."""
    table = torch.stack(trace).float().T
    stopped = torch.arange(table.shape[1], device=table.device)[None, :] > steps[:, None]
    return table.masked_fill(stopped, math.nan).cpu()


class BinaryMemory(MemoryEngine):
    """±1 states updated asynchronously: a step is one sweep over the D units in order.

    A query converges when a sweep flips nothing (step_size and tolerance do not apply); at
    the step limit it counts as converged if one more sweep would flip nothing.

    A kind keeps a running cache per query (local fields, overlaps) so that a single flip
    costs an update of the cache rather than a recomputation of the energy.
    """

    binary = True
    default_steps = 100

    def _prepare(self, states: Tensor) -> Tensor:
        """The running cache for `states`."""
        raise NotImplementedError

    def _sweep(self, states: Tensor, cache: Tensor, free: Tensor) -> Tensor:
        """One asynchronous sweep in place; returns which queries flipped a unit."""
        raise NotImplementedError

    def _stable(self, states: Tensor, cache: Tensor, free: Tensor) -> Tensor:
        """Which queries no single free unit flip would improve (a sweep would change nothing)."""
        raise NotImplementedError

    def _energy_from(self, states: Tensor, cache: Tensor) -> Tensor:
        raise NotImplementedError

    def _overlaps_from(self, states: Tensor, cache: Tensor) -> Tensor | None:
        return None

    def memory_weights(self, states: Tensor) -> Tensor:
        return states @ self.patterns.T / self.dim

    def _descend(self, states: Tensor, free: Tensor, steps: int, step_size: float, tolerance: float,
                 path: list[Tensor] | None) -> Descent:
        batch = states.shape[0]
        cache = self._prepare(states)
        trace = [self._energy_from(states, cache)]
        if path is not None:
            path.append(states.clone())  # the sweeps flip units in place
        active, converged, taken = self._bookkeeping(batch)
        for _ in range(steps):
            flipped = self._sweep(states, cache, free & active[:, None])
            converged |= active & ~flipped
            active &= flipped
            taken += active
            trace.append(self._energy_from(states, cache))
            if path is not None:
                path.append(states.clone())
            if not active.any():
                break
        converged |= active & self._stable(states, cache, free)
        return Descent(states, trace[-1], taken, converged, trace, path, self._overlaps_from(states, cache))


class GradientMemory(MemoryEngine):
    """Continuous states descending v ← v − α ∇E, the gradient taken by autograd.

    Per query, a step that would raise the energy is halved and retried (at most
    MAX_HALVINGS times), so every trace is non-increasing. A query converges when its next
    step would move no entry by more than `tolerance`, or when no step lowers its float32
    energy any more (it sits at a minimum to working precision).

    The line search evaluates its candidate steps together: the full step alone first (it is
    almost always accepted), then, for the queries that refused it, the next PROBES halvings in
    one evaluation. Over a sharded bank an evaluation is a round trip, so a search costs at
    most 1 + ⌈(MAX_HALVINGS − 1) / PROBES⌉ of them instead of one per halving; the outcome is
    that of trying the halvings one by one.
    """

    def _evaluate(self, states: Tensor) -> Evaluation:
        return Evaluation(*energy_and_gradient(self._energy, states))

    def _descend(self, states: Tensor, free: Tensor, steps: int, step_size: float, tolerance: float,
                 path: list[Tensor] | None) -> Descent:
        batch = states.shape[0]
        now = self._evaluate(states)
        gradient, nearest = now.gradient * free, now.nearest
        energy = now.energy
        trace = [energy]
        if path is not None:
            path.append(states)  # steps replace the states tensor rather than write into it
        active, converged, taken = self._bookkeeping(batch)

        def settled(gradient: Tensor) -> Tensor:
            return settled_by(gradient, step_size, tolerance)

        # Each query's step starts at twice its last accepted one, capped at α: after a halving
        # the next steps rarely need to search again.
        scale = torch.full((batch,), step_size, device=self.device)
        for _ in range(steps):
            done = active & settled(gradient)
            converged |= done
            active &= ~done
            if not active.any():
                break
            scale = torch.where(active, (2 * scale).clamp_max(step_size), 0.0)
            previous = energy
            pending = active.clone()
            tried, probes = 0, 1
            while pending.any() and tried < MAX_HALVINGS:
                probes = min(probes, MAX_HALVINGS - tried)
                # The full step is tried at every row (a stopped one stays where it is), so that an
                # evaluation sees the same batch whichever queries are still moving.
                rows = pending.nonzero()[:, 0] if tried else torch.arange(batch, device=self.device)
                # Candidate j of a pending query: its state minus scale/2^j times its gradient.
                halvings = 0.5 ** torch.arange(probes, device=self.device, dtype=scale.dtype)
                trial_scale = halvings[:, None] * scale[rows][None, :]  # probes × pending
                trials = states[rows][None] - trial_scale[..., None] * gradient[rows][None]
                found = self._evaluate(trials.reshape(-1, self.dim))
                lower = (found.energy.reshape(probes, -1) <= energy[rows][None])
                # The first candidate that does not raise the energy, as the one-by-one search finds it.
                first = torch.where(lower.any(dim=0), lower.int().argmax(dim=0), probes)
                accepted = (first < probes) & pending[rows]
                picked = first.clamp_max(probes - 1) * len(rows) + torch.arange(len(rows), device=self.device)
                chosen = found.index(picked)
                accept = torch.zeros_like(pending)
                accept[rows] = accepted
                take = rows[accepted]
                states = states.index_put((take,), trials.reshape(-1, self.dim)[picked[accepted]])
                energy = energy.index_put((take,), chosen.energy[accepted])
                gradient = gradient.index_put((take,), chosen.gradient[accepted] * free[take])
                if nearest is not None:
                    nearest = nearest.where(accept, _scattered(chosen.nearest, rows, batch))
                scale = scale.index_put((rows,), scale[rows] * 0.5 ** torch.where(accepted, first, probes)
                                        .to(scale.dtype))
                pending &= ~accept
                tried += probes
                probes = PROBES
            moved = active & ~pending
            taken += moved
            trace.append(energy)
            if path is not None:
                path.append(states)
            # No lower energy along the gradient, or a step that left it unchanged in float32:
            # the state is stationary at working precision.
            stationary = pending | (moved & (energy == previous))
            converged |= stationary
            active &= ~stationary
        converged |= active & settled(gradient)
        return Descent(states, energy, taken, converged, trace, path, nearest=nearest)


def _scattered(nearest: Nearest, rows: Tensor, batch: int) -> Nearest:
    """`nearest` of the queries `rows`, placed at those rows of a batch of `batch`."""
    def spread(values: Tensor) -> Tensor:
        return torch.zeros(batch, dtype=values.dtype, device=values.device).index_put((rows,), values)
    return Nearest(spread(nearest.best), spread(nearest.shard), spread(nearest.row))


def settled_by(gradient: Tensor, step_size: float, tolerance: float) -> Tensor:
    """Which queries' next step (α times the masked gradient) would move no entry by more than `tolerance`."""
    return (step_size * gradient).abs().amax(dim=-1) <= tolerance


def energy_and_gradient(energy: Callable[[Tensor], Tensor], states: Tensor) -> tuple[Tensor, Tensor]:
    """Per-state energies and their gradients: states are independent, so ∇ of the sum suffices.

    Works under torch.no_grad() and torch.inference_mode() alike.
    """
    with torch.inference_mode(False), torch.enable_grad():
        states = states.clone().requires_grad_()
        energies = energy(states)
        (gradient,) = torch.autograd.grad(energies.sum(), states)
    return energies.detach(), gradient


# ----- parameter readers: each names the offending field as params.<name> ----------------


def reject_unknown(kind: str, params: dict, known: Iterable[str]) -> None:
    known = set(known)
    for name in params:
        if name not in known:
            expected = ", ".join(sorted(known)) or "none"
            raise InvalidArgument(
                f"unknown parameter {name!r} for kind '{kind}' (accepted: {expected})", field=f"params.{name}"
            )


def read_positive_float(params: dict, name: str, default: float) -> float:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidArgument(f"{name} must be a finite number > 0, got {value!r}", field=f"params.{name}")
    return float(value)


def read_int(params: dict, name: str, default: int, low: int, high: int) -> int:
    value = params.get(name, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidArgument(f"{name} must be an integer in [{low}, {high}], got {value!r}", field=f"params.{name}")
    return value


def read_choice(params: dict, name: str, default: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    value = params.get(name, default)
    if value not in choices:
        raise InvalidArgument(f"{name} must be one of {', '.join(choices)}, got {value!r}", field=f"params.{name}")
    return value


def read_bool(params: dict, name: str, default: bool) -> bool:
    value: Any = params.get(name, default)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be true or false, got {value!r}", field=f"params.{name}")
    return value
