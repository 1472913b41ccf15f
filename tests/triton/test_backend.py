"""TritonBackend against a real Triton: the same answers and errors as the embedded backend, batching
of concurrent requests inside Triton, and banks that outlive a Triton restart.

The embedded backend answers bank operations by calling its BankRegistry directly; `RegistryBackend`
does the same, without the rest of the embedded backend (other models, micro-batching)."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest

from service.backends.triton import TritonBackend, _inputs
from service.banks.registry import BankRegistry, DynamicsOptions
from service.banks.store import SQLiteStore
from service.engines.lm import SamplingParams
from service.errors import AlreadyExists, Conflict, InvalidArgument, NotFound, Overloaded, Unavailable
from service.triton import associative_memory as memory_wire
from service.triton.launcher import free_port
from service.triton.spec import ASSOCIATIVE_MEMORY
from tests.helpers import outcome, run_scenario, settled_inference_counts
from tests.triton.fixtures import MEMORY_ONLY, launch

pytestmark = pytest.mark.triton

DIM = 16


class RegistryBackend:
    """The embedded backend's bank operations: one registry call each. Its banks' shards are served by
    `replica` (this process serves them all, as a single Triton does)."""

    def __init__(self, data_dir, replica: str = "local"):
        self.registry = BankRegistry(SQLiteStore(data_dir))
        self.registry.replica_names = [replica]

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self.registry.store.close()

    async def create_bank(self, name, kind, dim, params):
        return self.registry.create(name, kind, dim, params)

    async def bank_info(self, name):
        return self.registry.info(name)

    async def list_banks(self):
        return self.registry.list()

    async def delete_bank(self, name):
        return self.registry.delete(name)

    async def store(self, name, patterns, ids):
        return self.registry.store_patterns(name, patterns, ids)

    async def delete_pattern(self, name, pattern_id):
        return self.registry.delete_pattern(name, pattern_id)

    async def run_memory(self, name, queries, clamp, options):
        return self.registry.run_batch(name, [self.registry.check_queries(name, queries, clamp)], options)[0]


def bank_name() -> str:
    return "t-" + uuid.uuid4().hex[:12]


def random_patterns(count: int, seed: int) -> np.ndarray:
    return np.sign(np.random.default_rng(seed).standard_normal((count, DIM))).astype(np.float32)


@pytest.mark.parametrize("kind, params", [("modern", {"beta": 4.0}), ("classical", {})])
def test_every_operation_answers_like_the_embedded_backend(triton_server, tmp_path, kind, params):
    bank = bank_name()
    patterns = random_patterns(6, seed=1)
    ids = [f"p{i}" for i in range(6)]
    noisy = patterns.copy()
    noisy[:, :3] *= -1
    mask = np.zeros_like(patterns, dtype=bool)
    mask[:, DIM // 2:] = True

    async def scenario(triton: TritonBackend, embedded: RegistryBackend):
        calls = [
            lambda b: b.bank_info(bank),                                           # 404
            lambda b: b.create_bank(bank, kind, DIM, params),
            lambda b: b.create_bank(bank, kind, DIM, params),                      # 409 exists
            lambda b: b.create_bank(bank_name(), "no-such-kind", DIM, {}),         # 422 kind
            lambda b: b.create_bank("Bad Name", kind, DIM, {}),                    # 422 bank
            lambda b: b.run_memory(bank, noisy, None, DynamicsOptions()),          # 409 no patterns yet
            lambda b: b.store(bank, patterns, ids),
            lambda b: b.store(bank, patterns[:1], ["p0"]),                         # idempotent retry
            lambda b: b.store(bank, -patterns[:1], ["p0"]),                        # 409 other vector
            lambda b: b.store(bank, patterns[:, :5], None),                        # 422 dimension
            lambda b: b.bank_info(bank),
            lambda b: b.run_memory(bank, noisy, None, DynamicsOptions(trace=True)),
            lambda b: b.run_memory(bank, noisy, None, DynamicsOptions(steps=1)),
            lambda b: b.run_memory(bank, noisy * 0.5, mask, DynamicsOptions()),    # complete
            lambda b: b.run_memory(bank, noisy[:, :4], None, DynamicsOptions()),   # 422 queries
            lambda b: b.run_memory(bank, noisy, mask[:2], DynamicsOptions()),      # 422 mask
            lambda b: b.run_memory(bank, noisy, None, DynamicsOptions(steps=-1)),  # 422 steps
            lambda b: b.delete_pattern(bank, "p3"),
            lambda b: b.delete_pattern(bank, "p3"),                                # 404 id
            lambda b: b.run_memory(bank, patterns, None, DynamicsOptions()),
            lambda b: b.delete_bank(bank),
            lambda b: b.run_memory(bank, noisy, None, DynamicsOptions()),          # 404 bank
            lambda b: b.delete_bank(bank),                                         # 404 bank
        ]
        return [(await outcome(call(triton)), await outcome(call(embedded))) for call in calls]

    answers = run_scenario(scenario, TritonBackend(triton_server.url), RegistryBackend(tmp_path, triton_server.url))
    for step, (over_triton, embedded) in enumerate(answers):
        assert over_triton == embedded, f"call {step} differs"
    errors = [answer for answer, _ in answers if isinstance(answer, tuple) and isinstance(answer[0], type)]
    assert [(cls, field) for cls, field, _ in errors] == [
        (NotFound, "bank"), (AlreadyExists, "bank"), (InvalidArgument, "kind"), (InvalidArgument, "bank"),
        (Conflict, None), (Conflict, "ids[0]"), (InvalidArgument, "patterns"), (InvalidArgument, "queries"),
        (InvalidArgument, "mask"), (InvalidArgument, "steps"), (NotFound, "id"), (NotFound, "bank"),
        (NotFound, "bank")]
    retrieved = answers[11][0]
    assert len(retrieved) == len(noisy)
    assert retrieved.states.shape == (len(noisy), DIM) and retrieved.trace.shape[0] == len(noisy)
    assert all(pid in ids for pid in retrieved.nearest)


def test_concurrent_retrieves_share_executions(triton_server):
    """The gateway sends concurrent retrieves of one bank to Triton as one request, and Triton's own
    batcher merges concurrent requests (sent here without the gateway's batching) into one execution."""
    bank = bank_name()
    patterns = random_patterns(8, seed=2)
    queries = np.repeat(patterns, 8, axis=0)
    queries[np.arange(64), np.arange(64) % DIM] *= -1  # one flipped entry per query
    concurrent = 64

    async def scenario(triton: TritonBackend):
        await triton.create_bank(bank, "modern", DIM, {"beta": 4.0})
        await triton.store(bank, patterns, [f"p{i}" for i in range(8)])
        alone = [await triton.run_memory(bank, q[None], None, DynamicsOptions()) for q in queries[:8]]
        before = settled_inference_counts(triton_server.metrics_url, "associative_memory")
        together = await asyncio.gather(*(triton.run_memory(bank, q[None], None, DynamicsOptions())
                                          for q in queries))
        gateway = settled_inference_counts(triton_server.metrics_url, "associative_memory")
        raw = [_inputs(ASSOCIATIVE_MEMORY, memory_wire.request_arrays("run", bank, {}, vectors=q[None]))
               for q in queries]
        client = triton._replicas[0].client
        await asyncio.gather(*(client.infer(ASSOCIATIVE_MEMORY.name, inputs) for inputs in raw))
        after = settled_inference_counts(triton_server.metrics_url, "associative_memory", gateway[0] + concurrent)
        await triton.delete_bank(bank)
        return alone, together, before, gateway, after

    alone, together, before, gateway, after = run_scenario(scenario, TritonBackend(triton_server.url))
    assert 1 <= gateway[0] - before[0] < concurrent, "the gateway sent every retrieve alone"
    inferences, executions = after[0] - gateway[0], after[1] - gateway[1]
    assert inferences == concurrent
    assert executions < inferences, "Triton never batched concurrent requests"
    assert [r.nearest[0] for r in together] == [f"p{i // 8}" for i in range(concurrent)]
    for single, batched in zip(alone, together):
        np.testing.assert_allclose(batched.states[0], single.states[0], rtol=1e-5, atol=1e-6)


def test_banks_survive_a_restart_and_the_backend_reconnects(tmp_path):
    server = launch(tmp_path, MEMORY_ONLY)
    bank = bank_name()
    patterns = random_patterns(4, seed=3)

    async def scenario(triton: TritonBackend):
        await triton.create_bank(bank, "modern", DIM, {"beta": 4.0})
        await triton.store(bank, patterns, ["a", "b", "c", "d"])
        await asyncio.to_thread(server.stop)
        down = await triton.ready()
        with pytest.raises(Unavailable):
            await triton.bank_info(bank)
        server.launch()
        await asyncio.to_thread(server.wait_ready)
        for _ in range(50):  # bounded: the channel retries at least once a second
            if await triton.ready():
                break
            await asyncio.sleep(0.2)
        info = await triton.bank_info(bank)
        results = await triton.run_memory(bank, patterns, None, DynamicsOptions())
        return down, info, results

    try:
        down, info, results = run_scenario(scenario, TritonBackend(server.url))
    finally:
        server.stop()
    assert down is False
    assert (info.name, info.count) == (bank, 4)
    assert results.nearest == ["a", "b", "c", "d"]


def test_ready_is_false_and_calls_unavailable_without_triton():
    async def scenario(triton: TritonBackend):
        image = np.zeros((8, 8), np.float32)
        events = await triton.generate("hi", SamplingParams(), None)
        return (await triton.ready(), await outcome(triton.list_banks()),
                await outcome(triton.complete_image(image, image > 0, None)), await outcome(anext(events)),
                await triton.models())

    ready, listed, completed, generated, cards = run_scenario(
        scenario, TritonBackend(f"127.0.0.1:{free_port()}", ready_timeout=0.5))
    assert ready is False
    assert listed[0] is Unavailable and completed[0] is Unavailable and generated[0] is Unavailable
    assert [(card["id"], card["ready"]) for card in cards] == [("associative-memory", False),
                                                               ("energy-transformer", False)]


def test_a_full_triton_queue_is_overloaded(tmp_path):
    server = launch(tmp_path, MEMORY_ONLY, max_batch_size=1, max_queue_size=1)
    bank = bank_name()
    patterns = random_patterns(64, seed=4)

    async def scenario(triton: TritonBackend):
        await triton.create_bank(bank, "rbf", DIM, {})
        await triton.store(bank, patterns, None)
        # One request executes, one waits; with many more arriving at once, the rest must be refused.
        calls = [triton.run_memory(bank, patterns * 0.9, None, DynamicsOptions(steps=50, tolerance=0.0))
                 for _ in range(16)]
        return await asyncio.gather(*(outcome(call) for call in calls))

    try:
        answers = run_scenario(scenario, TritonBackend(server.url))
    finally:
        server.stop()
    refused = [a for a in answers if isinstance(a, tuple) and isinstance(a[0], type)]
    assert refused and all(cls is Overloaded for cls, _, _ in refused)
    assert len(refused) < len(answers)  # the executing and the queued request were answered


def test_models_lists_the_associative_memory(triton_server):
    async def scenario(triton: TritonBackend):
        return await triton.models()

    entry = next(card for card in run_scenario(scenario, TritonBackend(triton_server.url))
                 if card["id"] == "associative-memory")
    assert (entry["id"], entry["ready"]) == ("associative-memory", True)
    assert "modern" in entry["details"]["kinds"]
