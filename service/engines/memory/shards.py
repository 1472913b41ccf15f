"""Log-sum-exp memories (modern, rbf) and the exact merge that lets one bank live in shards.

Both kinds' energies are a log-sum-exp over per-pattern logits z_μ(v), and their gradient
∇E = v − ξ′ with ξ′ = Σ_μ softmax(z)_μ ξ_μ. Over patterns split into shards s, each shard
returns for every query its partial (Flash-Decoding's, ring attention's, vLLM's
`merge_attn_states`):

    m_s = max_μ z_μ,   l_s = Σ_μ e^{z_μ − m_s},   o_s = Σ_μ e^{z_μ − m_s} ξ_μ,   its nearest pattern

and the merge is exact: M = max_s m_s, L = Σ_s l_s e^{m_s − M}, ξ′ = Σ_s o_s e^{m_s − M} / L,
lse = M + log L (an empty shard has m = −∞ and drops out). An unsharded bank is the one-shard
case of the same code, so energies, steps and nearest patterns are computed one way for both.

The logits are z = β ξ·v (modern) and z = −β/2 ‖v − ξ‖² (rbf, expanded with ‖ξ‖ kept per pattern).
Sums run in float64 so that how the patterns are split changes a result by no more than float32
rounding of its inputs. rbf keeps its patterns in float64 and evaluates in float64 throughout: its
line search compares energies, and a comparison decided by float32 rounding would make the step
count depend on how the bank is split (and stall descents near a minimum).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from service.errors import Conflict, InvalidArgument

from .base import Evaluation, MemoryEngine, Nearest, read_int, read_positive_float, reject_unknown

MAX_SHARDS = 64


@dataclass
class Partial:
    """One shard's share of an evaluation at B states."""

    max_logit: Tensor  # B float64 m_s, −inf for an empty shard
    total: Tensor  # B float64 l_s
    weighted: Tensor  # B×D float64 o_s
    nearest: Nearest | None  # the shard's most similar pattern per state (row in the shard), when asked
    count: int  # patterns in the shard
    max_norm: float  # their largest norm (0 for an empty shard)

    def rows(self, start: int, stop: int) -> Partial:
        """The partial of states start..stop-1 (views)."""
        part = slice(start, stop)
        nearest = self.nearest and Nearest(self.nearest.best[part], self.nearest.shard[part], self.nearest.row[part])
        return Partial(self.max_logit[part], self.total[part], self.weighted[part], nearest, self.count, self.max_norm)


@dataclass
class Merged:
    lse: Tensor  # B float64 log Σ_μ e^{z_μ} over every shard
    mean: Tensor  # B×D float32 ξ′ = Σ_μ softmax(z)_μ ξ_μ
    nearest: Nearest | None  # when the partials carry theirs
    count: int
    max_norm: float


def merge(partials: Sequence[Partial]) -> Merged:
    """The exact combination of shard partials, in shard order (shard s is partials[s])."""
    top = torch.stack([p.max_logit for p in partials]).amax(dim=0)  # M; finite once a shard holds patterns
    total = torch.zeros_like(top)
    weighted = torch.zeros_like(partials[0].weighted)
    for p in partials:
        rescale = torch.exp(p.max_logit - top)  # e^{−∞} = 0 for an empty shard
        total += p.total * rescale
        weighted += p.weighted * rescale[:, None]
    return Merged(lse=top + total.log(), mean=(weighted / total[:, None]).float(), nearest=merged_nearest(partials),
                  count=sum(p.count for p in partials), max_norm=max(p.max_norm for p in partials))


def merged_nearest(partials: Sequence[Partial]) -> Nearest | None:
    if any(p.nearest is None for p in partials):
        return None
    best = torch.stack([p.nearest.best for p in partials])
    shard = best.argmax(dim=0)  # the first shard among equals
    pick = shard[None]
    return Nearest(best.gather(0, pick)[0], shard, torch.stack([p.nearest.row for p in partials]).gather(0, pick)[0])


def empty_partial(batch: int, dim: int, device: torch.device) -> Partial:
    return Partial(max_logit=torch.full((batch,), -math.inf, dtype=torch.float64, device=device),
                   total=torch.zeros(batch, dtype=torch.float64, device=device),
                   weighted=torch.zeros(batch, dim, dtype=torch.float64, device=device),
                   nearest=Nearest(torch.full((batch,), -math.inf, dtype=torch.float64, device=device),
                                   torch.zeros(batch, dtype=torch.int64, device=device),
                                   torch.full((batch,), -1, dtype=torch.int64, device=device)),
                   count=0, max_norm=0.0)


Partials = Callable[[Tensor], list[Partial]]


class LogSumExpMemory(MemoryEngine):
    """An engine of a log-sum-exp kind: a shard of a bank (its own patterns, `partial`) and, with
    `fan_out`, the dynamics of a whole sharded bank, evaluated by merging every shard's partials."""

    def __init__(self, dim: int, params: dict, device: str | torch.device = "cpu"):
        super().__init__(dim, params, device)
        self.beta: float = params["beta"]
        self.shards: int = params.get("shards", 1)
        # Its own patterns: the nearest one is found once, at the final states (MemoryEngine._nearest).
        self._partials: Partials = lambda states: [self.partial(states, nearest=False)]

    @classmethod
    def normalize_params(cls, dim: int, params: dict) -> dict:
        reject_unknown(cls.kind, params, ("beta", "shards"))
        normalized = {"beta": read_positive_float(params, "beta", 1.0)}
        shards = read_int(params, "shards", 1, 1, MAX_SHARDS)
        if shards > 1:  # an unsharded bank's params read as they always did
            normalized["shards"] = shards
        return normalized

    def fan_out(self, partials: Partials) -> None:
        """Evaluate through `partials` (one per shard, in shard order) rather than this engine's own patterns."""
        self._partials = partials

    def _logits(self, states: Tensor, overlaps: Tensor) -> Tensor:
        """z (B×K) at `states` from their overlaps Ξv."""
        raise NotImplementedError

    def _energy_from(self, states: Tensor, merged: Merged) -> Tensor:
        """E (B, float64) at `states` from the merged log-sum-exp."""
        raise NotImplementedError

    def partial(self, states: Tensor, nearest: bool = True) -> Partial:
        """This engine's patterns' share of an evaluation at B×D `states`, with each state's nearest pattern
        unless `nearest` is false (a fan-out asks for it every time: it cannot tell which evaluation is
        the last one)."""
        states = states.to(self.device, self.dtype)
        if self.count == 0:
            return empty_partial(states.shape[0], self.dim, self.device)
        overlaps = states @ self.patterns.T
        logits = self._logits(states, overlaps)
        top = logits.amax(dim=-1, keepdim=True)
        # A logit far enough below the top has a weight under the dtype's smallest normal number, and exp
        # takes a slow path for those (5x the time of the whole exp on typical banks). Clamped just above
        # (+1: exp of the bound itself rounds below it), such a weight is e times that number instead,
        # which no sum of at most 2^31 of them beside the top's 1 can show.
        weights = logits.sub_(top).clamp_min_(math.log(torch.finfo(logits.dtype).tiny) + 1.0).exp_()
        return Partial(max_logit=top[:, 0].double(), total=weights.sum(dim=-1, dtype=torch.float64),
                       weighted=(weights @ self.patterns).double(), nearest=self._best_of(overlaps) if nearest else None,
                       count=self.count, max_norm=self.pattern_norms.max().item())

    def _require_patterns(self) -> None:
        """Checked at the first evaluation, which knows every shard's count."""

    def _check_explainable(self) -> None:
        # The weights of the top memories would need every shard's top logits, not only its partial.
        if self.shards > 1:
            raise InvalidArgument("explain is not available on a sharded bank (params.shards > 1)", field="explain")

    def memory_weights(self, states: Tensor) -> Tensor:
        """softmax(z) over the patterns: each one's share of the mean ξ′ the state moves to."""
        states = states.to(self.device, self.dtype)
        return torch.softmax(self._logits(states, states @ self.patterns.T), dim=-1)

    def _evaluate(self, states: Tensor) -> Evaluation:
        merged = merge(self._partials(states))
        if merged.count == 0:
            raise Conflict("bank has no stored patterns")
        # Energies stay in the patterns' precision: rbf's line search compares them.
        return Evaluation(self._energy_from(states, merged).to(self.dtype), states - merged.mean, merged.nearest)

    def energy(self, states: Tensor) -> Tensor:
        return self._evaluate(states.to(self.device, torch.float32)).energy.float().cpu()
