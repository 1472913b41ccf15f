"""The `energy_transformer` and `llm` models in a real Triton, through TritonBackend: the same
answers and errors as the embedded backend on the same weights, Triton's batching of concurrent
image completions, tokens streamed as they are generated, cancellation reaching the model's scheduler,
and a full generation queue refused with 429.

The repository is the test export (tests/triton/fixtures.py): random weights, and an LM scheduler with
one decode slot and one waiting place."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.backends.embedded import EmbeddedBackend
from service.backends.triton import TritonBackend
from service.engines.lm import SamplingParams
from service.errors import InvalidArgument, TooManyRequests, Unavailable
from service.triton.export import export
from service.triton.launcher import TritonServer
from service.triton.spec import ASSOCIATIVE_MEMORY, ENERGY_TRANSFORMER
from tests.helpers import outcome, run_scenario, settled_inference_counts
from tests.triton.fixtures import TEST_LM_CONTEXT, TEST_LM_LIMITS, TEST_LM_NAME, export_for_tests

pytestmark = pytest.mark.triton


def embedded(triton_server, tmp_path) -> EmbeddedBackend:
    """The embedded backend on the Triton's repository: the same weights and scheduler limits."""
    return EmbeddedBackend(tmp_path / "data", model_repository=triton_server.model_repository, device="cpu",
                           max_running_sequences=TEST_LM_LIMITS["max_running_sequences"],
                           max_waiting_sequences=TEST_LM_LIMITS["max_waiting_sequences"],
                           max_context=TEST_LM_LIMITS["max_context"])


async def events_of(backend, prompt: str, params: SamplingParams, deadline: float | None = None):
    return [event async for event in await backend.generate(prompt, params, deadline)]


def digits(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    missing = rng.random((count, 8, 8)) < 0.4
    return rng.random((count, 8, 8), dtype=np.float32), missing


# ----- energy_transformer --------------------------------------------------------------------


def test_image_completion_answers_like_the_embedded_backend(triton_server, tmp_path):
    pixels, missing = digits(3)

    async def scenario(triton: TritonBackend, local: EmbeddedBackend):
        calls = [
            lambda b: b.complete_image(pixels[0], missing[0], None),
            lambda b: b.complete_image(pixels[1], missing[1], 3),
            lambda b: b.complete_image(pixels[2], missing[2], 0),
            lambda b: b.complete_image(pixels[0][:7, :7], missing[0][:7, :7], None),  # 422 image
            lambda b: b.complete_image(pixels[0], missing[0][:, :7], None),           # 422 mask
            lambda b: b.complete_image(pixels[0], missing[0], -1),                    # 422 steps
        ]
        return [(await outcome(call(triton)), await outcome(call(local))) for call in calls]

    answers = run_scenario(scenario, TritonBackend(triton_server.url), embedded(triton_server, tmp_path))
    for over_triton, local in answers[:3]:
        np.testing.assert_array_equal(over_triton[0], local[0])  # same engine, same float32 math
        np.testing.assert_array_equal(over_triton[1], local[1])
    assert len(answers[1][0][1]) == 4 and len(answers[2][0][1]) == 1
    for over_triton, local in answers[3:]:
        assert over_triton == local
    assert [error[:2] for error, _ in answers[3:]] == [(InvalidArgument, "image"), (InvalidArgument, "mask"),
                                                       (InvalidArgument, "steps")]


def test_concurrent_completions_share_executions(triton_server):
    concurrent = 32
    pixels, missing = digits(concurrent, seed=1)

    async def scenario(triton: TritonBackend):
        alone = [await triton.complete_image(pixels[i], missing[i], None) for i in range(4)]
        before = settled_inference_counts(triton_server.metrics_url, "energy_transformer")
        together = await asyncio.gather(*(triton.complete_image(pixels[i], missing[i], None)
                                          for i in range(concurrent)))
        after = settled_inference_counts(triton_server.metrics_url, "energy_transformer", before[0] + concurrent)
        return alone, together, before, after

    alone, together, before, after = run_scenario(scenario, TritonBackend(triton_server.url))
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == concurrent
    assert executions < inferences, "Triton never batched concurrent image completions"
    for single, batched in zip(alone, together):
        np.testing.assert_allclose(batched[0], single[0], atol=1e-5)
        np.testing.assert_allclose(batched[1], single[1], rtol=1e-5, atol=1e-4)


def test_without_weights_the_energy_transformer_answers_503_and_is_not_ready(tmp_path, monkeypatch):
    """The rest of the repository is served all the same, as over the embedded backend."""
    from service.triton import export as exporter

    repository = export_for_tests(tmp_path / "repository", tmp_path / "data", (ASSOCIATIVE_MEMORY,))
    monkeypatch.setattr(exporter, "SHIPPED_REPOSITORY", tmp_path / "no-weights")  # nothing to copy along
    export(repository, data_dir=tmp_path / "data", max_batch_size=8, max_queue_delay_us=100, max_queue_size=16,
           device_kind="cpu", models=(ENERGY_TRANSFORMER,))
    assert not (repository / "energy_transformer" / "1" / "model.safetensors").exists()
    server = TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0, data_dir=tmp_path / "data")
    pixels, missing = digits(1)

    async def scenario(triton: TritonBackend):
        return (await triton.models(), await outcome(triton.complete_image(pixels[0], missing[0], None)),
                await triton.list_banks())

    cards, completed, banks = run_scenario(scenario, TritonBackend(server=server))
    assert [(c["id"], c["ready"]) for c in cards] == [("associative-memory", True), ("energy-transformer", False)]
    assert completed[0] is Unavailable and "weights not found" in completed[2]
    assert banks == []


# ----- llm -----------------------------------------------------------------------------------


def test_generation_answers_like_the_embedded_backend(triton_server, tmp_path):
    requests = [
        ("Hello", SamplingParams(max_tokens=12, temperature=0, logprobs=3)),
        ("Once upon a time", SamplingParams(max_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=3)),
        ("The", SamplingParams(max_tokens=20, temperature=1.2, seed=5, stop=("e",))),
        ("", SamplingParams(max_tokens=3, temperature=0)),
    ]

    async def scenario(triton: TritonBackend, local: EmbeddedBackend):
        answers = [(await events_of(triton, p, s), await events_of(local, p, s)) for p, s in requests]
        too_long = "hello " * (TEST_LM_CONTEXT + 10)
        errors = (await outcome(events_of(triton, too_long, SamplingParams())),
                  await outcome(events_of(local, too_long, SamplingParams())))
        return answers, errors

    answers, errors = run_scenario(scenario, TritonBackend(triton_server.url), embedded(triton_server, tmp_path))
    for over_triton, local in answers:
        assert over_triton == local
    assert answers[0][0][-1]["finish_reason"] == answers[1][0][-1]["finish_reason"] == "length"
    assert all(e["logprobs"] and len(e["logprobs"]["top"]) == 3 for e in answers[0][0][:-1])
    assert errors[0] == errors[1] and errors[0][:2] == (InvalidArgument, "prompt")


def test_tokens_stream_as_they_are_generated(triton_server):
    tokens = 800

    async def scenario(triton: TritonBackend):
        started = time.perf_counter()
        arrivals = []
        async for event in await triton.generate("Hello", SamplingParams(max_tokens=tokens, temperature=0), None):
            arrivals.append((time.perf_counter() - started, event))
        return arrivals

    arrivals = run_scenario(scenario, TritonBackend(triton_server.url))
    events = [event for _, event in arrivals]
    assert [e["type"] for e in events] == ["token"] * tokens + ["finish"]
    times = [t for t, _ in arrivals]
    # One response per token, each sent when sampled: the first arrives long before the last, and
    # arrivals are spread over the generation rather than delivered in one burst at the end.
    assert times[0] < times[-1] / 4
    assert len({round(t, 4) for t in times}) >= tokens // 2


def test_closing_the_stream_cancels_the_sequence_in_triton(triton_server):
    """The scheduler has one decode slot: a second generation can only run once the first has left it."""
    long_tokens, probe = 4000, 100

    async def scenario(triton: TritonBackend):
        events = await triton.generate("Hello", SamplingParams(max_tokens=long_tokens, temperature=0), None)
        first = await anext(events)
        started = time.perf_counter()
        for _ in range(probe):
            assert (await anext(events))["type"] == "token"
        per_token = (time.perf_counter() - started) / probe
        await events.aclose()  # cancels the gRPC stream
        closed = time.perf_counter()
        short = await events_of(triton, "Hi", SamplingParams(max_tokens=3, temperature=0))
        return first, per_token, time.perf_counter() - closed, short

    first, per_token, waited, short = run_scenario(scenario, TritonBackend(triton_server.url))
    assert first["type"] == "token"
    assert short[-1]["finish_reason"] == "length"
    remaining = (long_tokens - probe) * per_token  # how long the first would still have run
    assert waited < remaining / 4, f"waited {waited:.2f}s for the slot; the first had {remaining:.2f}s to go"


def test_a_timeout_ends_the_generation_with_deadline(triton_server):
    params = SamplingParams(max_tokens=TEST_LM_CONTEXT - 8, temperature=0)
    events = run_scenario(lambda triton: events_of(triton, "Hello", params, deadline=0.2), TritonBackend(triton_server.url))
    assert events[-1]["finish_reason"] == "deadline"
    assert events[-1]["usage"]["completion_tokens"] < params.max_tokens


def test_a_full_generation_queue_is_too_many_requests(triton_server):
    """One decode slot, one waiting place: with a generation running and one waiting, the next is
    refused; once the waiting one's client gives up, its place is free again (before any slot is)."""
    short = SamplingParams(max_tokens=2, temperature=0)

    async def first_answers(triton: TritonBackend, count: int) -> tuple[list[asyncio.Task], list[BaseException]]:
        """`count` new generations' first events as tasks: those still waiting after a refusal would
        have arrived (a refusal takes milliseconds, once more than 0.5 s under a loaded CI run; the running
        generation takes many seconds)."""
        tasks = [asyncio.ensure_future(anext(await triton.generate("Hi", short, None))) for _ in range(count)]
        await asyncio.wait(tasks, timeout=2.0)
        return [t for t in tasks if not t.done()], [t.exception() for t in tasks if t.done()]

    async def scenario(triton: TritonBackend):
        running = await triton.generate("Hello", SamplingParams(max_tokens=TEST_LM_CONTEXT - 8, temperature=0), None)
        await anext(running)  # it holds the only decode slot
        queued, refused = await first_answers(triton, 2)
        queued[0].cancel()  # its client gives up while it waits: the gRPC stream is cancelled
        for _ in range(20):  # bounded: the model looks at waiting requests every 0.1 s
            requeued, refused_again = await first_answers(triton, 1)
            if requeued:
                break
            await asyncio.sleep(0.1)
        await running.aclose()  # frees the slot: the one in the waiting place runs
        assert requeued, "the cancelled request still held the waiting place after 20 tries"
        return refused, refused_again, await requeued[0]

    refused, refused_again, first = run_scenario(scenario, TritonBackend(triton_server.url))
    assert len(refused) == 1 and isinstance(refused[0], TooManyRequests)
    assert all(isinstance(error, TooManyRequests) for error in refused_again)
    assert first["type"] == "token"


def test_models_lists_every_model_ready(triton_server):
    cards = run_scenario(lambda triton: triton.models(), TritonBackend(triton_server.url))
    assert [(c["id"], c["task"], c["ready"]) for c in cards] == [
        (TEST_LM_NAME, "text-generation", True), ("associative-memory", "retrieve", True),
        ("energy-transformer", "image-completion", True)]
    assert cards[0]["details"] == {"context": TEST_LM_CONTEXT,
                                   "running_slots": TEST_LM_LIMITS["max_running_sequences"]}
