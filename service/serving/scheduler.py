"""Continuous (iteration-level) batching of text generation in one background thread.

Each iteration: apply cancellations and deadlines, prefill newly admitted requests into free
cache slots (each gets its first token right away), then run ONE batched decode forward for
every running sequence and sample all of them at once. Sequences leave the batch as soon as
they finish; the last running sequence moves into the freed slot, so running sequences always
occupy slots 0..n-1 and the decode reads the cache as a view.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict, computed_field

from service.engines.lm.model import Transformer
from service.engines.lm.sampling import (SamplingParams, StopMatcher, TokenLogprobs, make_generator, prompt_logprobs,
                                         sample)
from service.engines.lm.tokenizer import IncrementalDecoder, Tokenizer
from service.errors import InvalidArgument, Overloaded, Unavailable
from service.openmp import release_pool

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "cancelled", "deadline", "error")
# Prompt tokens prefilled in one forward pass: its attention mask is this squared (booleans).
PREFILL_BATCH_TOKENS = 1024


@dataclass(frozen=True)
class Chat:
    """A conversation: the prompt is its rendering with the model's chat template."""

    messages: tuple[dict[str, str], ...]  # {"role", "content"}


Prompt = str | Sequence[int] | Chat  # text, token ids used as given, or a conversation


@dataclass(frozen=True)
class GenerationRequest:
    prompt: Prompt
    params: SamplingParams = field(default_factory=SamplingParams)
    deadline: float | None = None  # time.monotonic() value after which it finishes with "deadline"


class Usage(BaseModel):
    """Token counts of one generation, as every API answers them."""

    model_config = ConfigDict(frozen=True)

    prompt_tokens: int
    completion_tokens: int  # every sampled token, the end-of-sequence token included

    @computed_field
    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenEvent:
    request_id: int
    token_id: int
    text: str  # new text; empty while an incomplete character or a possible stop string is held back
    logprobs: TokenLogprobs | None


@dataclass(frozen=True)
class PromptEvent:
    """The prompt, first of the events of a request with `echo`."""

    request_id: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs | None] | None  # per prompt token (None for the first), with `logprobs` only


@dataclass(frozen=True)
class FinishEvent:
    request_id: int
    finish_reason: str  # one of FINISH_REASONS
    usage: Usage
    text: str = ""  # text still held back at the end, released now: append it to the token texts
    error: str | None = None


Event = PromptEvent | TokenEvent | FinishEvent


@dataclass(frozen=True)
class RequestHandle:
    id: int


@dataclass(frozen=True)
class SchedulerStats:
    running: int
    waiting: int
    prompt_tokens: int  # totals since start
    generated_tokens: int


@dataclass(eq=False)
class _Sequence:
    handle: RequestHandle
    prompt_ids: list[int]
    params: SamplingParams
    deadline: float | None
    on_event: Callable[[Event], None]
    generator: torch.Generator
    decoder: IncrementalDecoder
    stop: StopMatcher
    length: int = 0  # tokens in the cache
    last_token: int = -1  # sampled, not yet in the cache
    generated: int = 0
    finished: bool = False


class Scheduler:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_batch_size: int = 16,
                 max_waiting: int = 64, max_context: int = 2048):
        """Owns the model's KV cache (one scheduler per model): max_batch_size slots of
        max_context positions (capped by the model's own context)."""
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_waiting = max_batch_size, max_waiting
        self.cache = model.setup_cache(max_batch_size, max_context)
        self.max_context = self.cache.max_context
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # running[i] lives in cache slot i
        self._cancelled: set[int] = set()
        self._prompt_tokens = self._generated_tokens = 0
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="lm-scheduler", daemon=True)
        self._thread.start()

    # --- public interface (any thread) ----------------------------------------------------

    def submit(self, request: GenerationRequest, on_event: Callable[[Event], None]) -> RequestHandle:
        """Queue a request; `on_event` is then called from the scheduler thread."""
        prompt_ids = self.prompt_ids(request.prompt)
        if len(prompt_ids) > self.max_context:
            raise InvalidArgument(f"prompt is {len(prompt_ids)} tokens, the context holds {self.max_context}",
                                  field="prompt")
        sequence = _Sequence(handle=RequestHandle(next(self._ids)), prompt_ids=prompt_ids, params=request.params,
                             deadline=request.deadline, on_event=on_event,
                             generator=make_generator(request.params.seed),
                             decoder=self.tokenizer.incremental_decoder(), stop=StopMatcher(request.params.stop))
        with self._lock:
            if self._closed:
                raise Unavailable("the generation scheduler is shut down")
            if len(self._waiting) >= self.max_waiting:
                raise Overloaded(f"{len(self._waiting)} generation requests already waiting")
            self._waiting.append(sequence)
            self._lock.notify()
        return sequence.handle

    def cancel(self, handle: RequestHandle) -> None:
        """The request finishes with "cancelled" at the next step (no-op if already finished)."""
        with self._lock:
            self._cancelled.add(handle.id)
            self._lock.notify()

    def stats(self) -> SchedulerStats:
        with self._lock:
            return SchedulerStats(len(self._running), len(self._waiting), self._prompt_tokens, self._generated_tokens)

    def close(self) -> None:
        """Stop the thread; unfinished requests finish with "cancelled"."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        if threading.current_thread() is not self._thread:  # close() may come from an on_event callback
            self._thread.join()

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The ids `submit` runs, checked (tokenising is slow on a long text: callers on an event loop
        call this in a thread, then submit the ids)."""
        if isinstance(prompt, Chat):
            ids = self.tokenizer.encode_chat(prompt.messages)
        else:
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if any(not 0 <= i < self.model.config.vocab_size for i in ids):
            raise InvalidArgument("prompt token ids out of the model's vocabulary", field="prompt")
        if not ids:  # an empty prompt starts from the beginning-of-text token
            start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None \
                else self.tokenizer.eos_token_id
            if start is None:
                raise InvalidArgument("prompt must not be empty", field="prompt")
            ids = [start]
        return ids

    # --- scheduler thread ----------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                idle = not (self._closed or self._waiting or self._running)
            if idle:  # out of work, its OpenMP workers go: they would slow another thread's (service/openmp.py)
                release_pool()
            with self._lock:
                while not (self._closed or self._waiting or self._running):
                    self._lock.wait()
                if self._closed:
                    break
                cancelled, self._cancelled = self._cancelled, set()
                dropped = [s for s in self._waiting if s.handle.id in cancelled or _expired(s)]
                for sequence in dropped:
                    self._waiting.remove(sequence)
                free = self.max_batch_size - len(self._running)
                admitted = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
            for sequence in dropped:
                self._finish(sequence, "cancelled" if sequence.handle.id in cancelled else "deadline")
            for sequence in list(self._running):
                if sequence.handle.id in cancelled:
                    self._retire(sequence, "cancelled")
                elif _expired(sequence):
                    self._retire(sequence, "deadline")
            try:
                self._prefill(admitted)
                if self._running:
                    self._decode()
            except Exception as error:  # a failed decode fails its batch, not the service
                log.exception("generation step failed")
                for sequence in dict.fromkeys([*self._running, *admitted]):
                    self._retire(sequence, "error", error=str(error))
        with self._lock:
            leftover = [*self._running, *self._waiting]
            self._waiting.clear()
        for sequence in leftover:
            self._retire(sequence, "cancelled")

    def _prefill(self, admitted: list[_Sequence]) -> None:
        """Prefill the admitted requests into the next free slots and sample their first tokens.
        Those without echo run together (`Transformer.prefill_many`, up to PREFILL_BATCH_TOKENS
        tokens a pass): arriving at once, they would otherwise each pay a pass over every weight
        before the first of them gets its first token."""
        started: list[_Sequence] = []
        logits: list[torch.Tensor] = []
        together = [s for s in admitted if not s.params.echo and s.params.max_tokens > 0]
        for group in _token_bounded_groups(together, PREFILL_BATCH_TOKENS):
            if len(group) == 1:
                self._prefill_one(group[0], started, logits)
                continue
            first_slot = len(self._running)
            try:
                last = self.model.prefill_many(
                    [torch.tensor(s.prompt_ids, device=self.model.device) for s in group],
                    range(first_slot, first_slot + len(group)))
            except Exception:  # e.g. out of memory: each on its own, so that only what fails fails
                log.exception("batched prefill of %d requests failed, prefilling them one by one", len(group))
                for sequence in group:
                    self._prefill_one(sequence, started, logits)
                continue
            for sequence, row in zip(group, last):
                self._started(sequence, row, started, logits)
        batched = {id(s) for s in together}
        for sequence in admitted:
            if id(sequence) not in batched:
                self._prefill_one(sequence, started, logits)
        if started:
            self._sample_and_emit(started, torch.stack(logits))

    def _prefill_one(self, sequence: _Sequence, started: list[_Sequence], logits: list[torch.Tensor]) -> None:
        prompt = torch.tensor(sequence.prompt_ids, device=self.model.device)
        echo = sequence.params.echo
        try:
            last = self.model.prefill(prompt, slot=len(self._running), every_position=echo)
            if echo:
                last = self._echo(sequence, last)
        except Exception as error:  # e.g. out of memory on a long prompt: fails that request only
            log.exception("prefill failed for request %d", sequence.handle.id)
            self._finish(sequence, "error", error=str(error))
            return
        self._started(sequence, last, started, logits)

    def _started(self, sequence: _Sequence, last: torch.Tensor, started: list[_Sequence],
                 logits: list[torch.Tensor]) -> None:
        """A prefilled request takes the next slot (its cache is there), unless it is done already."""
        with self._lock:
            self._prompt_tokens += len(sequence.prompt_ids)
        if sequence.finished:  # its consumer went away at the prompt event
            return
        if sequence.params.max_tokens == 0:  # scoring the prompt only: nothing to sample
            self._finish(sequence, "length")
            return
        sequence.length = len(sequence.prompt_ids)
        started.append(sequence)
        logits.append(last)
        with self._lock:
            self._running.append(sequence)

    def _echo(self, sequence: _Sequence, every_position: torch.Tensor) -> torch.Tensor:
        """Emit the prompt event; -> the last position's logits, from which the first token is sampled."""
        ids, top = sequence.prompt_ids, sequence.params.logprobs
        scored = prompt_logprobs(every_position, ids, top) if top else None
        self._emit(sequence, PromptEvent(sequence.handle.id, ids, self.tokenizer.decode(ids), scored))
        return every_position[-1]

    def _decode(self) -> None:
        running = list(self._running)
        tokens = torch.tensor([s.last_token for s in running], device=self.model.device)
        logits = self.model.decode(tokens, range(len(running)), [s.length for s in running])
        for sequence in running:
            sequence.length += 1
        self._sample_and_emit(running, logits)

    def _sample_and_emit(self, sequences: list[_Sequence], logits: torch.Tensor) -> None:
        eos = self.tokenizer.eos_token_id
        held = [row for row, s in enumerate(sequences) if s.generated < s.params.min_tokens]
        if held and eos is not None:  # min_tokens: the end of sequence cannot be drawn yet
            logits = logits.clone()  # the model's is an inference tensor, not writable here
            logits[held, eos] = float("-inf")
        out = sample(logits, [s.params for s in sequences], [s.generator for s in sequences])
        with self._lock:
            self._generated_tokens += len(sequences)
        for sequence, token, logprobs in zip(sequences, out.tokens.tolist(), out.logprobs):
            self._accept(sequence, token, logprobs)

    def _accept(self, sequence: _Sequence, token: int, logprobs: TokenLogprobs | None) -> None:
        sequence.generated += 1
        sequence.last_token = token
        if token == self.tokenizer.eos_token_id and not sequence.params.ignore_eos:
            self._retire(sequence, "stop")
            return
        text, stopped = sequence.stop.push(sequence.decoder.push(token))
        if not self._emit(sequence, TokenEvent(sequence.handle.id, token, text, logprobs)):
            return
        if stopped:
            self._retire(sequence, "stop", release_text=False)
        elif sequence.generated >= sequence.params.max_tokens or sequence.length >= self.max_context:
            self._retire(sequence, "length")

    def _emit(self, sequence: _Sequence, event: Event) -> bool:
        try:
            sequence.on_event(event)
            return True
        except Exception:  # a broken consumer cancels its own request only
            log.exception("on_event failed for request %d", sequence.handle.id)
            if not isinstance(event, FinishEvent):
                self._retire(sequence, "cancelled")
            return False

    def _retire(self, sequence: _Sequence, reason: str, *, release_text: bool = True, error: str | None = None) -> None:
        """Leave the batch (if in it): the last running sequence takes over the freed slot."""
        with self._lock:
            if sequence in self._running:
                slot, last = self._running.index(sequence), self._running[-1]
                if last is not sequence:
                    self.cache.move(len(self._running) - 1, slot, last.length)
                    self._running[slot] = last
                self._running.pop()
        self._finish(sequence, reason, release_text=release_text, error=error)

    def _finish(self, sequence: _Sequence, reason: str, *, release_text: bool = True, error: str | None = None) -> None:
        if sequence.finished:
            return
        sequence.finished = True
        tail = ""
        if release_text:
            tail, _ = sequence.stop.push(sequence.decoder.flush())
            tail += sequence.stop.flush()
        usage = Usage(prompt_tokens=len(sequence.prompt_ids), completion_tokens=sequence.generated)
        self._emit(sequence, FinishEvent(sequence.handle.id, reason, usage, tail, error))


def _token_bounded_groups(sequences: list[_Sequence], limit: int) -> list[list[_Sequence]]:
    """Consecutive groups of at most `limit` prompt tokens (a longer prompt is a group of its own)."""
    groups: list[list[_Sequence]] = []
    tokens = limit
    for sequence in sequences:
        n = len(sequence.prompt_ids)
        if tokens + n > limit:
            groups.append([])
            tokens = 0
        groups[-1].append(sequence)
        tokens += n
    return groups


def _expired(sequence: _Sequence) -> bool:
    return sequence.deadline is not None and time.monotonic() >= sequence.deadline


def event_dict(event: Event, tokenizer: Tokenizer) -> dict:
    """An event as plain JSON-able data, logprobs with their token strings: what both backends stream."""
    if isinstance(event, FinishEvent):
        return {"type": "finish", "finish_reason": event.finish_reason, "text": event.text, "error": event.error,
                "usage": event.usage.model_dump()}
    if isinstance(event, PromptEvent):
        return {"type": "prompt", "token_ids": event.token_ids, "text": event.text,
                "tokens": [tokenizer.decode([i]) for i in event.token_ids], "logprobs": None if
                event.logprobs is None else [_logprobs_dict(e, tokenizer) if e else None for e in event.logprobs]}
    logprobs = None if event.logprobs is None else _logprobs_dict(event.logprobs, tokenizer)
    return {"type": "token", "token_id": event.token_id, "text": event.text, "logprobs": logprobs}


def _logprobs_dict(logprobs: TokenLogprobs, tokenizer: Tokenizer) -> dict:
    token = tokenizer.decode
    return {"token": token([logprobs.token_id]), "token_id": logprobs.token_id, "logprob": logprobs.logprob,
            "top": [{"token": token([i]), "token_id": i, "logprob": lp} for i, lp in logprobs.top]}
