"""The `llm` model's request handling in-process (no Triton): parameters parsed and refused with
their field, events as the embedded backend yields them, refusals as one final error, and a stream
reported cancelled cancelled in the scheduler."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from service.engines.lm import SamplingParams, load_model
from service.errors import InvalidArgument, Overloaded
from service.serving.scheduler import Scheduler
from service.triton.llm import TextGeneration, decode_event, parse_inputs, request_arrays
from tests.triton.fixtures import TEST_LM_CONTEXT, write_test_lm


class FakeStream:
    """Records what model.py's response sender would send."""

    def __init__(self, cancel_after: int | None = None):
        self.events: list[tuple[dict, bool]] = []
        self.error: BaseException | None = None
        self.cancel_after = cancel_after
        self.done = threading.Event()

    def send(self, event: dict, final: bool) -> None:
        # Through the wire's encoding, as the gateway reads it.
        self.events.append((decode_event(np.array([[json.dumps(event).encode()]], dtype=object)), final))
        if final:
            self.done.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done.set()

    def is_cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.events) >= self.cancel_after

    def wait_started(self) -> None:
        """Until it has its first event, i.e. holds the decode slot."""
        deadline = time.monotonic() + 30
        while not self.events and time.monotonic() < deadline:
            time.sleep(0.005)
        assert self.events


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return load_model(write_test_lm(tmp_path_factory.mktemp("lm")))


@pytest.fixture()
def generation(lm):
    model, tokenizer = lm
    generation = TextGeneration(Scheduler(model, tokenizer, max_batch_size=1, max_waiting=1,
                                          max_context=TEST_LM_CONTEXT))
    yield generation
    generation.close()


def inputs(prompt: str, params: SamplingParams, timeout: float | None = None) -> dict:
    arrays = request_arrays(prompt, params, timeout)
    return {name: array[0] for name, array in arrays.items()}


def test_parameters_round_trip_and_bad_ones_name_their_field():
    params = SamplingParams(max_tokens=7, temperature=0.5, top_k=3, top_p=0.9, seed=11, stop=("a", "b"), logprobs=2)
    parsed = parse_inputs(*inputs("héllo \ud800", params, timeout=2.5).values())
    assert parsed.prompt == "héllo \ud800" and parsed.params == params
    assert 0 < parsed.deadline - time.monotonic() <= 2.5
    assert parse_inputs(*inputs("x", SamplingParams()).values()).deadline is None

    def refused(params_json: str) -> str:
        with pytest.raises(InvalidArgument) as info:
            parse_inputs(np.array([b"x"], dtype=object), np.array([params_json.encode()], dtype=object))
        return info.value.field

    assert refused('{"temperature": -1}') == "temperature"
    assert refused('{"top_p": 0}') == "top_p"
    assert refused('{"max_tokens": 0}') == "max_tokens"
    assert refused('{"stop": "."}') == "stop"
    assert refused('{"timeout": 0}') == "timeout"
    assert refused('{"beam_width": 2}') == "beam_width"
    assert refused("[1, 2]") == "params"
    assert refused("not json") == "params"


def test_events_are_the_embedded_backends_dicts(generation):
    stream = FakeStream()
    generation.start(inputs("Hello", SamplingParams(max_tokens=6, temperature=0, logprobs=2)), stream)
    assert stream.done.wait(30)
    tokens = [event for event, final in stream.events if not final]
    [(finish, final)] = stream.events[-1:]
    assert final and len(tokens) == 6 and all(not f for _, f in stream.events[:-1])
    assert finish == {"type": "finish", "finish_reason": "length", "text": finish["text"], "error": None,
                      "usage": {"prompt_tokens": 1, "completion_tokens": 6, "total_tokens": 7}}
    decode = generation.scheduler.tokenizer.decode
    for event in tokens:
        assert set(event) == {"type", "token_id", "text", "logprobs"} and event["type"] == "token"
        assert event["logprobs"]["token_id"] == event["token_id"]
        assert event["logprobs"]["token"] == decode([event["token_id"]])
        assert [alt["token"] for alt in event["logprobs"]["top"]] == [decode([a["token_id"]])
                                                                      for a in event["logprobs"]["top"]]


def test_refusals_are_one_final_error(generation):
    stream = FakeStream()
    generation.start(inputs("hello " * (TEST_LM_CONTEXT + 10), SamplingParams()), stream)  # longer than the context
    assert isinstance(stream.error, InvalidArgument) and stream.error.field == "prompt" and not stream.events
    stream = FakeStream()
    generation.start({"PROMPT": None, "PARAMS": None}, stream)
    assert isinstance(stream.error, InvalidArgument) and stream.error.field == "prompt"

    long = [FakeStream(), FakeStream()]  # one running, one waiting: the next is refused
    for s in long:
        generation.start(inputs("Hi", SamplingParams(max_tokens=TEST_LM_CONTEXT - 8, temperature=0)), s)
        long[0].wait_started()
    assert long[1].error is None
    third = FakeStream()
    generation.start(inputs("Hi", SamplingParams(max_tokens=2)), third)
    assert isinstance(third.error, Overloaded)
    for s in long:
        s.cancel_after = 0  # Triton reports both streams cancelled
    assert all(s.done.wait(30) for s in long)


def test_a_cancelled_stream_is_cancelled_in_the_scheduler(generation):
    stream = FakeStream(cancel_after=3)
    generation.start(inputs("Hello", SamplingParams(max_tokens=250, temperature=0)), stream)
    assert stream.done.wait(30)
    finish, final = stream.events[-1]
    assert final and finish["finish_reason"] == "cancelled"
    assert len(stream.events) == 4  # three tokens, none after the cancellation, then the final event
    assert generation.scheduler.stats().running == 0


def test_a_request_cancelled_while_it_waits_leaves_the_queue(generation):
    running, waiting = FakeStream(), FakeStream()
    generation.start(inputs("Hello", SamplingParams(max_tokens=TEST_LM_CONTEXT - 8, temperature=0)), running)
    running.wait_started()
    generation.start(inputs("Hi", SamplingParams(max_tokens=5, temperature=0)), waiting)
    waiting.cancel_after = 0  # Triton reports it cancelled before it ever got a slot
    assert waiting.done.wait(30)
    assert [(event["type"], event["finish_reason"], final) for event, final in waiting.events] == [
        ("finish", "cancelled", True)]
    assert waiting.events[0][0]["usage"]["completion_tokens"] == 0
    assert not running.done.is_set()  # it left the queue while the other was still generating
    running.cancel_after = 0
    assert running.done.wait(30)
