"""Continuous batching: results equal each request run alone (greedy, no cache), requests join
and leave mid-flight, cancellation, limits. Ordering is checked through the event log, never
through timings."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import torch

from service.engines.lm import ModelConfig, SamplingParams, Tokenizer, Transformer
from service.errors import InvalidArgument, Overloaded
from service.serving.scheduler import Event, FinishEvent, GenerationRequest, PromptEvent, Scheduler, TokenEvent, Usage

CONTEXT = 128
PROMPTS = ["The quick brown fox", "Hello", "Once upon a time, in a land far away,", "1 2 3"]
GREEDY = SamplingParams(temperature=0, max_tokens=16)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(arch="gpt2", vocab_size=50257, dim=32, n_layers=2, n_heads=4, n_kv_heads=4,
                         ffn_dim=64, max_context=CONTEXT, tied_head=False)
    model = Transformer(config).eval()
    with torch.no_grad():  # wide weights: varied continuations, and greedy never hinges on rounding
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.normal_(std=1.0)
    return model


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.gpt2()


@pytest.fixture()
def make_scheduler(model, tokenizer):
    schedulers = []

    def make(**kwargs) -> Scheduler:
        schedulers.append(Scheduler(model, kwargs.pop("tokenizer", tokenizer), **kwargs))
        return schedulers[-1]

    yield make
    for scheduler in schedulers:
        scheduler.close()


def alone(model: Transformer, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """Reference: greedy decoding with full forwards, no cache, no batch."""
    tokens = list(prompt_ids)
    for _ in range(new_tokens):
        tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt_ids):]


class EventLog:
    """Every event in the order the scheduler emitted it; hooks run inside the scheduler thread."""

    def __init__(self):
        self.events: list[Event] = []
        self.hooks: list[Callable[[Event], None]] = []
        self._finished: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        for hook in self.hooks:
            hook(event)
        if isinstance(event, FinishEvent):
            self._done(event.request_id).set()

    def _done(self, request_id: int) -> threading.Event:
        with self._lock:
            return self._finished.setdefault(request_id, threading.Event())

    def wait(self, *handles) -> None:
        for handle in handles:
            assert self._done(handle.id).wait(timeout=120), f"request {handle.id} did not finish"

    def tokens(self, handle) -> list[int]:
        return [e.token_id for e in self.events if isinstance(e, TokenEvent) and e.request_id == handle.id]

    def text(self, handle) -> str:
        return "".join(e.text for e in self.events if e.request_id == handle.id)

    def finish(self, handle) -> FinishEvent:
        return next(e for e in self.events if isinstance(e, FinishEvent) and e.request_id == handle.id)

    def index(self, handle, kind: type, nth: int = 0) -> int:
        positions = [i for i, e in enumerate(self.events) if isinstance(e, kind) and e.request_id == handle.id]
        return positions[nth]


def test_batched_results_equal_each_request_alone(make_scheduler, model, tokenizer):
    scheduler = make_scheduler(max_batch_size=2)  # four requests through two slots: joins and leaves
    log = EventLog()
    lengths = [5, 20, 12, 30]
    handles = [scheduler.submit(GenerationRequest(p, SamplingParams(temperature=0, max_tokens=n)), log)
               for p, n in zip(PROMPTS, lengths)]
    log.wait(*handles)
    for handle, prompt, n in zip(handles, PROMPTS, lengths):
        ids = tokenizer.encode(prompt)
        assert log.tokens(handle) == alone(model, ids, n)
        assert log.text(handle) == tokenizer.decode(log.tokens(handle))
        finish = log.finish(handle)
        assert (finish.finish_reason, finish.usage.prompt_tokens, finish.usage.completion_tokens) == (
            "length", len(ids), n)
    stats = scheduler.stats()
    assert (stats.running, stats.waiting) == (0, 0)
    assert stats.prompt_tokens == sum(len(tokenizer.encode(p)) for p in PROMPTS)
    assert stats.generated_tokens == sum(lengths)


def test_requests_arriving_together_are_prefilled_in_one_pass(make_scheduler, model, tokenizer, monkeypatch):
    passes = []
    real_prefill_many = model.prefill_many

    def prefill_many(prompts, slots):
        passes.append([p.tolist() for p in prompts])
        return real_prefill_many(prompts, slots)

    monkeypatch.setattr(model, "prefill_many", prefill_many)
    scheduler = make_scheduler(max_batch_size=4)
    log = EventLog()
    with scheduler._lock:  # the scheduler admits all three at its next step
        handles = [scheduler.submit(GenerationRequest(p, GREEDY), log) for p in PROMPTS[:3]]
    log.wait(*handles)
    assert passes == [[tokenizer.encode(p) for p in PROMPTS[:3]]]
    for handle, prompt in zip(handles, PROMPTS):
        assert log.tokens(handle) == alone(model, tokenizer.encode(prompt), GREEDY.max_tokens)


def test_new_request_starts_before_running_ones_finish(make_scheduler, model, tokenizer):
    scheduler = make_scheduler(max_batch_size=4)
    log = EventLog()
    long = SamplingParams(temperature=0, max_tokens=40)
    first, second = (scheduler.submit(GenerationRequest(p, long), log) for p in PROMPTS[:2])
    joined = []

    def submit_mid_generation(event: Event) -> None:
        if isinstance(event, TokenEvent) and event.request_id == first.id and len(log.tokens(first)) == 5:
            joined.append(scheduler.submit(GenerationRequest(PROMPTS[2], GREEDY), log))

    log.hooks.append(submit_mid_generation)
    log.wait(first, second)
    late = joined[0]
    log.wait(late)
    assert log.index(late, TokenEvent) < log.index(first, FinishEvent)
    assert log.index(late, TokenEvent) < log.index(second, FinishEvent)
    assert log.tokens(late) == alone(model, tokenizer.encode(PROMPTS[2]), GREEDY.max_tokens)
    assert log.tokens(first) == alone(model, tokenizer.encode(PROMPTS[0]), 40)


def test_cancel_frees_the_slot_and_the_others_continue(make_scheduler, model, tokenizer):
    scheduler = make_scheduler(max_batch_size=4)
    log = EventLog()
    long = SamplingParams(temperature=0, max_tokens=50)
    cancelled = scheduler.submit(GenerationRequest(PROMPTS[0], long), log)  # slot 0
    survivor = scheduler.submit(GenerationRequest(PROMPTS[1], long), log)  # moves into slot 0 after
    running_seen = []

    def hook(event: Event) -> None:
        if isinstance(event, TokenEvent) and event.request_id == cancelled.id and len(log.tokens(cancelled)) == 3:
            running_seen.append(("before", scheduler.stats().running))
            scheduler.cancel(cancelled)
        if isinstance(event, TokenEvent) and event.request_id == survivor.id and any(
                isinstance(e, FinishEvent) and e.request_id == cancelled.id for e in log.events):
            running_seen.append(("after", scheduler.stats().running))

    log.hooks.append(hook)
    log.wait(cancelled, survivor)
    assert log.finish(cancelled).finish_reason == "cancelled"
    assert len(log.tokens(cancelled)) < 50
    assert running_seen[0] == ("before", 2) and running_seen[1] == ("after", 1)
    assert log.tokens(survivor) == alone(model, tokenizer.encode(PROMPTS[1]), 50)
    assert log.finish(survivor).finish_reason == "length"


def test_stop_string_ends_the_request_and_is_not_returned(make_scheduler, model, tokenizer):
    ids = tokenizer.encode(PROMPTS[0])
    reference = tokenizer.decode(alone(model, ids, 20))
    start = len(tokenizer.decode(alone(model, ids, 4)))
    stop = reference[start:start + 3]
    expected = reference[:reference.index(stop)]
    scheduler = make_scheduler()
    log = EventLog()
    handle = scheduler.submit(GenerationRequest(PROMPTS[0], SamplingParams(temperature=0, max_tokens=20,
                                                                         stop=(stop,))), log)
    log.wait(handle)
    assert log.finish(handle).finish_reason == "stop"
    assert log.text(handle) == expected
    assert len(log.tokens(handle)) < 20


def test_end_of_sequence_token_stops_without_being_emitted(make_scheduler, model):
    tokenizer = Tokenizer.gpt2()
    ids = tokenizer.encode(PROMPTS[1])
    tokenizer.eos_token_id = alone(model, ids, 4)[3]  # the model's 4th greedy token ends the sequence
    scheduler = make_scheduler(tokenizer=tokenizer)
    log = EventLog()
    handle = scheduler.submit(GenerationRequest(PROMPTS[1], GREEDY), log)
    log.wait(handle)
    finish = log.finish(handle)
    assert (finish.finish_reason, finish.usage.completion_tokens) == ("stop", 4)
    assert log.tokens(handle) == alone(model, ids, 3)


def test_same_seed_same_text_in_and_out_of_a_batch(make_scheduler):
    scheduler = make_scheduler()
    log = EventLog()
    params = SamplingParams(temperature=1.0, top_k=50, max_tokens=24, seed=99, logprobs=3)
    together = [scheduler.submit(GenerationRequest(PROMPTS[0], params), log) for _ in range(2)]
    other = scheduler.submit(GenerationRequest(PROMPTS[0], SamplingParams(temperature=1.0, max_tokens=24, seed=7)),
                             log)
    log.wait(*together, other)
    later = scheduler.submit(GenerationRequest(PROMPTS[0], params), log)
    log.wait(later)
    assert log.tokens(together[0]) == log.tokens(together[1]) == log.tokens(later)
    assert log.tokens(other) != log.tokens(later)
    logprobs = [e.logprobs for e in log.events if isinstance(e, TokenEvent) and e.request_id == later.id]
    assert all(lp is not None and len(lp.top) == 3 for lp in logprobs)


def test_full_waiting_queue_is_overloaded(make_scheduler):
    scheduler = make_scheduler(max_batch_size=1, max_waiting=1)
    log = EventLog()
    running = scheduler.submit(GenerationRequest(PROMPTS[0], SamplingParams(temperature=0, max_tokens=50)), log)
    outcomes = []

    def fill_queue(event: Event) -> None:  # runs in the scheduler thread: nothing is admitted meanwhile
        if isinstance(event, TokenEvent) and event.request_id == running.id and not outcomes:
            outcomes.append(scheduler.submit(GenerationRequest(PROMPTS[1], GREEDY), log))
            try:
                scheduler.submit(GenerationRequest(PROMPTS[2], GREEDY), log)
            except Overloaded as error:
                outcomes.append(error)
            scheduler.cancel(running)

    log.hooks.append(fill_queue)
    log.wait(running)
    queued, rejection = outcomes
    log.wait(queued)
    assert isinstance(rejection, Overloaded)
    assert log.finish(queued).finish_reason == "length"


@pytest.mark.parametrize("prompt", [[11] * (CONTEXT + 1), [50257]], ids=["longer-than-context", "outside-vocab"])
def test_invalid_prompt_is_rejected(make_scheduler, prompt):
    scheduler = make_scheduler()
    with pytest.raises(InvalidArgument) as error:
        scheduler.submit(GenerationRequest(prompt), lambda event: None)
    assert error.value.field == "prompt"


def test_failed_prefill_fails_only_its_request(make_scheduler, model, tokenizer, monkeypatch):
    real_prefill = model.prefill

    def prefill(tokens: torch.Tensor, slot: int, every_position: bool = False) -> torch.Tensor:
        if tokens.tolist() == [11, 11, 11]:
            raise RuntimeError("out of memory")
        return real_prefill(tokens, slot, every_position)

    def prefill_many(prompts: list[torch.Tensor], slots) -> torch.Tensor:
        if any(p.tolist() == [11, 11, 11] for p in prompts):  # then each is prefilled on its own
            raise RuntimeError("out of memory")
        return real_prefill_many(prompts, slots)

    real_prefill_many = model.prefill_many
    monkeypatch.setattr(model, "prefill", prefill)
    monkeypatch.setattr(model, "prefill_many", prefill_many)
    scheduler = make_scheduler()
    log = EventLog()
    with scheduler._lock:  # admitted in the same step: prefilled together, then (failing that) alone
        failing = scheduler.submit(GenerationRequest([11, 11, 11], GREEDY), log)
        healthy = scheduler.submit(GenerationRequest(PROMPTS[0], GREEDY), log)
    log.wait(failing, healthy)
    assert log.finish(failing).finish_reason == "error" and "out of memory" in log.finish(failing).error
    assert log.tokens(healthy) == alone(model, tokenizer.encode(PROMPTS[0]), GREEDY.max_tokens)


def test_generation_stops_at_the_end_of_the_context(make_scheduler):
    scheduler = make_scheduler()
    log = EventLog()
    handle = scheduler.submit(GenerationRequest([11] * (CONTEXT - 3), SamplingParams(max_tokens=50)), log)
    log.wait(handle)
    assert log.finish(handle).finish_reason == "length"
    assert len(log.tokens(handle)) == 4  # positions CONTEXT-3 .. CONTEXT-1 in the cache, plus the last


def test_expired_deadline_finishes_without_tokens(make_scheduler):
    scheduler = make_scheduler()
    log = EventLog()
    handle = scheduler.submit(GenerationRequest(PROMPTS[0], GREEDY, deadline=time.monotonic() - 1), log)
    log.wait(handle)
    assert log.finish(handle).finish_reason == "deadline" and log.tokens(handle) == []


def test_echo_scores_the_prompt_as_a_full_forward_does(make_scheduler, model, tokenizer):
    scheduler = make_scheduler()
    log = EventLog()
    ids = tokenizer.encode(PROMPTS[1])
    scoring = scheduler.submit(GenerationRequest(ids, SamplingParams(max_tokens=0, echo=True, logprobs=3)), log)
    echoed = scheduler.submit(GenerationRequest(ids, SamplingParams(temperature=0, max_tokens=6, echo=True)), log)
    log.wait(scoring, echoed)

    prompt = log.events[log.index(scoring, PromptEvent)]
    assert prompt.token_ids == ids and prompt.text == PROMPTS[1]
    expected = torch.log_softmax(model(torch.tensor([ids]))[0], dim=-1)
    assert prompt.logprobs[0] is None
    for position, entry in enumerate(prompt.logprobs[1:]):
        assert entry.token_id == ids[position + 1]
        assert entry.logprob == pytest.approx(expected[position, ids[position + 1]].item(), abs=1e-4)
        assert [i for i, _ in entry.top] == expected[position].topk(3).indices.tolist()
    assert log.tokens(scoring) == [] and log.finish(scoring).finish_reason == "length"
    assert log.finish(scoring).usage == Usage(prompt_tokens=len(ids), completion_tokens=0)

    # echo without logprobs: the prompt's text only, first; the generation is unchanged
    assert log.index(echoed, PromptEvent) < log.index(echoed, TokenEvent)
    assert log.events[log.index(echoed, PromptEvent)].logprobs is None
    assert log.tokens(echoed) == alone(model, ids, 6)


def test_min_tokens_holds_back_eos_and_ignore_eos_generates_past_it(make_scheduler, model, tokenizer):
    ids = tokenizer.encode(PROMPTS[0])
    first = alone(model, ids, 1)[0]
    ending_there = Tokenizer.gpt2()
    ending_there.eos_token_id = first  # the model's greedy first token now ends the sequence
    scheduler = make_scheduler(tokenizer=ending_there)
    log = EventLog()
    plain = scheduler.submit(GenerationRequest(ids, SamplingParams(temperature=0, max_tokens=8)), log)
    held = scheduler.submit(GenerationRequest(ids, SamplingParams(temperature=0, max_tokens=8, min_tokens=3)), log)
    ignoring = scheduler.submit(GenerationRequest(ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)),
                                log)
    log.wait(plain, held, ignoring)
    assert log.finish(plain).finish_reason == "stop" and log.finish(plain).usage.completion_tokens == 1
    assert len(log.tokens(held)) >= 3 and first not in log.tokens(held)[:3]
    assert log.tokens(ignoring) == alone(model, ids, 8) and log.finish(ignoring).finish_reason == "length"
