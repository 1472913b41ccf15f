"""Next-token sampling for a batch of sequences, each with its own parameters and generator.

Order of the transforms (as in HF `generate`): temperature, then top-k, then top-p, then
renormalise. One uniform number per sequence comes from that request's own CPU generator and
picks a token by inverse CDF, so a seed reproduces the same text whatever else is in the batch
and on any device.

Reported log-probabilities are those of the distribution actually sampled from, i.e. after
temperature, top-k and top-p (what Transformer Explainer displays). For greedy decoding
(temperature 0) they are those of the same pipeline at temperature 1.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from service.errors import InvalidArgument

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int = 0  # number of alternatives to report per token; 0 = none
    echo: bool = False  # report the prompt first: its text and, with logprobs, each prompt token's logprob
    min_tokens: int = 0  # the end-of-sequence token cannot be sampled before this many tokens
    ignore_eos: bool = False  # the end-of-sequence token does not end the generation

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        validate_sampling(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1


def validate_sampling(params: SamplingParams) -> None:
    """Raise InvalidArgument naming the offending field."""
    if not isinstance(params.max_tokens, int) or params.max_tokens < (0 if params.echo else 1):
        raise InvalidArgument("max_tokens must be an integer >= 1 (0 only with echo: scoring the prompt)",
                              field="max_tokens")
    if not isinstance(params.min_tokens, int) or not 0 <= params.min_tokens <= params.max_tokens:
        raise InvalidArgument("min_tokens must be an integer in [0, max_tokens]", field="min_tokens")
    if not isinstance(params.echo, bool) or not isinstance(params.ignore_eos, bool):
        raise InvalidArgument("echo and ignore_eos must be booleans", field="echo" if not isinstance(
            params.echo, bool) else "ignore_eos")
    if not math.isfinite(params.temperature) or params.temperature < 0:
        raise InvalidArgument("temperature must be >= 0", field="temperature")
    if not isinstance(params.top_k, int) or params.top_k < 0:
        raise InvalidArgument("top_k must be an integer >= 0 (0 disables it)", field="top_k")
    if not math.isfinite(params.top_p) or not 0 < params.top_p <= 1:
        raise InvalidArgument("top_p must be in (0, 1]", field="top_p")
    if params.seed is not None and (not isinstance(params.seed, int) or not 0 <= params.seed < 2**63):
        raise InvalidArgument("seed must be an integer in [0, 2^63)", field="seed")
    if not isinstance(params.logprobs, int) or not 0 <= params.logprobs <= MAX_LOGPROBS:
        raise InvalidArgument(f"logprobs must be an integer in [0, {MAX_LOGPROBS}]", field="logprobs")
    if len(params.stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in params.stop):
        raise InvalidArgument(f"stop must be at most {MAX_STOP_STRINGS} non-empty strings", field="stop")


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request; unseeded requests get a random seed of their own."""
    return torch.Generator().manual_seed(seed if seed is not None else secrets.randbits(63))


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float  # of the chosen token
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), most likely first


@dataclass(frozen=True)
class SampleOutput:
    tokens: Tensor  # (B,) on the logits' device
    logprobs: list[TokenLogprobs | None]  # per row; None where not requested


def sample(logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]) -> SampleOutput:
    """One token for each row of `logits` (B, vocab), row b following params[b]."""
    B, vocab = logits.shape
    device = logits.device
    logits = logits.float()
    wants_logprobs = any(p.logprobs for p in params)
    if all(p.greedy for p in params) and not wants_logprobs:
        return SampleOutput(logits.argmax(dim=-1), [None] * B)
    greedy = torch.tensor([p.greedy for p in params], device=device)

    temperature = torch.tensor([p.temperature if not p.greedy else 1.0 for p in params], device=device)
    probs = torch.softmax(logits / temperature[:, None], dim=-1)
    token_order = None
    if any(p.filters for p in params) or wants_logprobs:
        probs, token_order = probs.sort(dim=-1, descending=True)
        probs = _top_k_top_p(probs, params)

    # In (0, 1], so the inverse CDF never lands on a token of probability zero.
    uniform = 1 - torch.cat([torch.rand(1, generator=g) for g in generators]).to(device)
    cdf = probs.cumsum(dim=-1)
    drawn = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None]).clamp_(max=vocab - 1)[:, 0]
    if token_order is not None:
        drawn = token_order.gather(1, drawn[:, None])[:, 0]
    tokens = torch.where(greedy, logits.argmax(dim=-1), drawn)
    if not wants_logprobs:
        return SampleOutput(tokens, [None] * B)
    return SampleOutput(tokens, _logprobs(probs, token_order, tokens, params))


def sampling_distribution(logits: Tensor, params: SamplingParams) -> tuple[Tensor, Tensor, Tensor]:
    """What `sample` draws from for one row of logits (vocab): the token ids in descending
    probability, their probabilities softmax(logits / T) (T = 1 for greedy), and the distribution
    after top-k and top-p, renormalised (zero where they remove a token; greedy keeps the first only)."""
    probs = torch.softmax(logits.float() / (1.0 if params.greedy else params.temperature), dim=-1)
    probs, order = probs.sort(descending=True)
    if params.greedy:
        return order, probs, torch.zeros_like(probs).index_fill_(0, torch.tensor([0], device=probs.device), 1.0)
    return order, probs, _top_k_top_p(probs[None], [params])[0]


def _top_k_top_p(sorted_probs: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """Zero out, per row, what top-k and top-p remove from descending probabilities; renormalise."""
    device = sorted_probs.device
    vocab = sorted_probs.shape[-1]
    top_k = torch.tensor([p.top_k or vocab for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    rank = torch.arange(vocab, device=device)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    # top-p keeps the smallest prefix whose mass reaches p (the first token always survives).
    keep = (rank < top_k[:, None]) & ((mass_before < top_p[:, None]) | (rank == 0))
    kept = sorted_probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def _logprobs(sorted_probs: Tensor, token_order: Tensor, tokens: Tensor,
              params: Sequence[SamplingParams]) -> list[TokenLogprobs | None]:
    n_max = max(p.logprobs for p in params)
    chosen_rank = (token_order == tokens[:, None]).int().argmax(dim=-1)
    chosen = sorted_probs.gather(1, chosen_rank[:, None])[:, 0].log().tolist()
    top_probs = sorted_probs[:, :n_max].tolist()
    top_ids = token_order[:, :n_max].tolist()
    token_list = tokens.tolist()
    result: list[TokenLogprobs | None] = []
    for b, p in enumerate(params):
        if not p.logprobs:
            result.append(None)
            continue
        top = [(i, math.log(q)) for i, q in zip(top_ids[b][:p.logprobs], top_probs[b][:p.logprobs]) if q > 0]
        result.append(TokenLogprobs(token_list[b], chosen[b], top))
    return result


class StopMatcher:
    """Finds stop strings in streamed text. Text that could be the start of a stop string is
    held back until it is known not to be; the stop string and anything after it are dropped."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """-> (text safe to emit now, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        buffer = self._pending + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._pending = ""
            return buffer[:min(hits)], True
        held = max((k for s in self.stops for k in range(1, min(len(s), len(buffer) + 1))
                    if buffer.endswith(s[:k])), default=0)
        self._pending = buffer[len(buffer) - held:]
        return buffer[:len(buffer) - held], False

    def flush(self) -> str:
        text, self._pending = self._pending, ""
        return text


def prompt_logprobs(logits: Tensor, prompt_ids: Sequence[int], top: int, chunk: int = 256
                    ) -> list[TokenLogprobs | None]:
    """Each prompt token's log-probability under the model given the tokens before it, with the
    `top` most likely alternatives: the raw distribution (temperature 1, no filtering), which is what
    scoring a text means. `logits` (T, vocab) are the prefill's at every prompt position; the first
    token has no context, hence None (as OpenAI and vLLM answer)."""
    targets = torch.tensor(prompt_ids[1:], device=logits.device)
    result: list[TokenLogprobs | None] = [None]
    for start in range(0, len(targets), chunk):  # log_softmax a slice at a time: T × vocab floats twice is a lot
        rows = targets[start:start + chunk]
        logprobs = torch.log_softmax(logits[start:start + len(rows)].float(), dim=-1)
        chosen = logprobs.gather(1, rows[:, None])[:, 0].tolist()
        top_values, top_ids = logprobs.topk(top, dim=-1)
        for token, logprob, ids, values in zip(rows.tolist(), chosen, top_ids.tolist(), top_values.tolist()):
            result.append(TokenLogprobs(token, logprob, list(zip(ids, values))))
    return result
