"""Models run inside Triton; this backend talks to it over gRPC (tritonclient aio).

Every bank operation is one inference request to the `associative_memory` model (the format is in
service/triton/associative_memory.py); Triton's dynamic batcher groups concurrent requests and the
model runs one batched dynamics per bank. An image completion is one request to `energy_transformer`
(service/triton/energy_transformer.py), batched the same way. A generation is one request to the
decoupled `llm` model on a gRPC stream of its own (ModelStreamInfer; service/triton/llm.py): one
response per event; closing the event stream early cancels the gRPC stream, which the model notices
and cancels the sequence in its scheduler. The models' errors come back as the same service error
classes the embedded backend raises, so the API answers identically over either backend.

Several Triton replicas (`--triton-url a:8001,b:8001`) share a PostgreSQL store and follow its change
log. Then this gateway commits bank writes to the store itself (service/banks/writer.py), so writes
depend on PostgreSQL alone; reads go to the replicas in turn, and one that is down, behind the version
asked for, or full is skipped for the next, so a client sees an error only when every replica failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, InferInput, InferRequestedOutput
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException

from service import metrics
from service.backends.base import image_card, memory_card, text_card
from service.banks.registry import (BankInfo, DynamicsOptions, Fidelity, MemoryResults, checked_queries, results_of,
                                    stacked)
from service.banks.shards import replicas_of
from service.banks.store import BankRecord, Store
from service.banks.writer import BankWriter
from service.engines.lm.weights import DEFAULT_MODEL_NAME
from service.engines.memory import make_engine
from service.engines.memory.shards import Partial
from service.errors import InvalidArgument, Overloaded, ServiceError, TooManyRequests, Unavailable
from service.serving.batching import MicroBatcher
from service.triton import associative_memory as memory_wire
from service.triton import energy_transformer as et_wire
from service.triton import llm as llm_wire
from service.triton.launcher import TritonServer
from service.triton.spec import ASSOCIATIVE_MEMORY, ENERGY_TRANSFORMER, LLM, ModelSpec
from service.triton.wire import error_from_message

if TYPE_CHECKING:
    from service.engines.lm.explain import TextExplanation
    from service.engines.lm.sampling import SamplingParams
    from service.serving.scheduler import Prompt

QUEUE_FULL = "Exceeds maximum queue size"
# Batches of sharded-bank dynamics in progress at once (each a worker thread waiting on its fan-outs).
SHARDED_RUNS = 4
# A fan-out that a closing gateway never runs must not hold its worker thread forever.
FAN_OUT_TIMEOUT_S = 300.0
# How long a replica that failed a call goes to the back of the line.
SUSPECT_S = 2.0
# Statuses meaning "Triton (or the model) cannot answer now" rather than "this request is wrong".
UNAVAILABLE_STATUSES = {str(code) for code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                               grpc.StatusCode.CANCELLED, grpc.StatusCode.NOT_FOUND)}
# A channel whose server went away retries with exponential backoff (up to 2 minutes by default);
# capping it at 1 s lets the backend notice a restarted Triton within a second.
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def service_error(exc: InferenceServerException, model: str = ASSOCIATIVE_MEMORY.name) -> ServiceError:
    """The service error a failed Triton call to `model` stands for."""
    message = exc.message() or ""
    decoded = error_from_message(message)
    if decoded is not None:
        return decoded
    if QUEUE_FULL in message:
        return Overloaded(f"the {model} queue in Triton is full")
    if exc.status() in UNAVAILABLE_STATUSES or "is not ready" in message or "unknown model" in message:
        return Unavailable(f"Triton cannot serve {model} now: {message}")
    return ServiceError(f"Triton failed: {message}")


def generation_error(error: ServiceError) -> ServiceError:
    """A full generation queue is 429 Too Many Requests, as over the embedded backend."""
    if isinstance(error, Overloaded) and not isinstance(error, TooManyRequests):
        return TooManyRequests(error.message, retry_after=error.retry_after)
    return error


@dataclass(eq=False)
class Replica:
    """One Triton endpoint; `failed_at` is when a call to it last failed for being unavailable."""

    url: str
    client: triton_aio.InferenceServerClient
    failed_at: float = -math.inf

    def suspect(self) -> bool:
        return time.monotonic() - self.failed_at < SUSPECT_S


class TritonBackend:
    name = "triton"

    def __init__(self, url: str | None = None, *, server: TritonServer | None = None, store: Store | None = None,
                 ready_timeout: float = 1.0, request_timeout: float | None = None, max_batch_size: int = 64,
                 max_queue_delay_us: int = 500, max_queue_size: int = 1024):
        """Talks to the Triton at gRPC `url` (host:port), or to several replicas (comma-separated) that
        follow one shared `store`. Without a url, start() launches `server` (by default
        TritonServer("model_repository") on its default ports) and close() stops it.

        With a shared store (PostgreSQL) this gateway commits bank writes itself, and reads go to the
        replicas in turn, each asking for the version of this gateway's last write of the bank."""
        if url is None and server is None:
            server = TritonServer("model_repository")
        self.server = server if url is None else None
        self.urls = [part.strip() for part in url.split(",") if part.strip()] if url is not None else [server.url]
        shared = store is not None and store.shared
        if len(self.urls) > 1 and not shared:
            raise InvalidArgument("several Triton replicas need a shared store (--store postgresql://…)",
                                  field="triton_url")
        self.writer = BankWriter(store) if shared else None
        self.ready_timeout = ready_timeout
        self.request_timeout = request_timeout
        self._replicas: list[Replica] = []
        self._turn = 0
        self._store_failed = False
        self._parameters: dict[str, dict[str, str]] = {}  # per model, read once
        self._banks: dict[str, BankInfo] = {}  # as last seen: whether a bank is sharded, its kind and params
        # Generations this gateway has in Triton: waiting for their first token, then running.
        self._generations = {"waiting": 0, "running": 0}
        # A sharded bank's dynamics run in this gateway: concurrent requests on one bank with the same
        # options batch, so that each evaluation is one fan-out for all of them.
        self._shard_threads = ThreadPoolExecutor(max_workers=SHARDED_RUNS, thread_name_prefix="amserve-shards")
        batching = dict(max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                        max_queue_size=max_queue_size)
        self._sharded_runs = MicroBatcher(self._run_sharded, executor=self._shard_threads,
                                          max_concurrent_batches=SHARDED_RUNS, **batching)
        # Concurrent runs on one unsharded bank with the same options go to Triton as one request: a
        # request costs this gateway and Triton more than a row does (Triton's batcher merges what is left).
        # Two batches per replica at once: one computing while the next one travels.
        self._runs = MicroBatcher(self._run_batch, executor=None, max_concurrent_batches=2 * len(self.urls),
                                  **batching)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        if self.server is not None:
            self.server.launch()  # on the loop's thread: Triton's parent-death signal follows that thread
            await asyncio.to_thread(self.server.wait_ready)
        # Channels connect lazily and reconnect by themselves, so replicas may come and go.
        self._replicas = [Replica(url, triton_aio.InferenceServerClient(url, channel_args=CHANNEL_ARGS))
                          for url in self.urls]
        # The scheduler lives in Triton; the gateway's gauges count the generations it streams from there.
        metrics.RUNNING_SEQUENCES.labels("llm").set_function(lambda: self._generations["running"])
        metrics.WAITING_SEQUENCES.labels("llm").set_function(lambda: self._generations["waiting"])
        self._loop = asyncio.get_running_loop()
        self._sharded_runs.start()
        self._runs.start()

    async def close(self) -> None:
        await self._sharded_runs.close()
        await self._runs.close()
        # Not waiting: a run still in progress waits on fan-outs that need this loop, which is closing.
        self._shard_threads.shutdown(wait=False, cancel_futures=True)
        for replica in self._replicas:
            await replica.client.close()
        self._replicas = []
        if self.writer is not None:
            await asyncio.to_thread(self.writer.store.close)
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)

    def _in_turn(self) -> list[Replica]:
        """Every replica, starting one further each call (load spreads), those that failed lately last."""
        if not self._replicas:
            raise Unavailable("the Triton backend is not started")
        self._turn = (self._turn + 1) % len(self._replicas)
        ordered = self._replicas[self._turn:] + self._replicas[:self._turn]
        return sorted(ordered, key=Replica.suspect)

    async def ready(self) -> bool:
        """True when a replica's server and associative_memory model are ready (within `ready_timeout`)."""
        return any(await asyncio.gather(*(self._model_ready(r, ASSOCIATIVE_MEMORY.name, server=True)
                                          for r in self._replicas)))

    async def degraded(self) -> list[str]:
        """Replicas that are not ready while others serve, and the store while this gateway's last
        write to it failed (reads go on from the replicas)."""
        ready = await asyncio.gather(*(self._model_ready(r, ASSOCIATIVE_MEMORY.name, server=True)
                                       for r in self._replicas))
        down = [] if all(ready) or len(ready) == 1 else [f"triton {r.url}" for r, up in zip(self._replicas, ready)
                                                         if not up]
        return down + (["store"] if self._store_failed else [])

    async def _model_ready(self, replica: Replica, model: str, server: bool = False) -> bool:
        client = replica.client
        try:
            async with asyncio.timeout(self.ready_timeout):
                return ((not server or await client.is_server_ready(client_timeout=self.ready_timeout))
                        and await client.is_model_ready(model, client_timeout=self.ready_timeout))
        except (InferenceServerException, TimeoutError):
            return False

    async def _serving(self) -> Replica | None:
        """The first ready replica, in turn; None when none is."""
        for replica in self._in_turn():
            if await self._model_ready(replica, ASSOCIATIVE_MEMORY.name, server=True):
                return replica
        return None

    async def models(self) -> list[dict]:
        replica = await self._serving()
        if replica is None:
            return [memory_card(False), image_card(False, None)]
        image, text = await asyncio.gather(self._model_ready(replica, ENERGY_TRANSFORMER.name),
                                           self._model_ready(replica, LLM.name))
        image_parameters = await self._model_parameters(replica, ENERGY_TRANSFORMER.name) if image else None
        # Exported without its weights, the model loads and answers 503: it publishes no image_size.
        image_size = (image_parameters or {}).get("image_size")
        cards = [memory_card(True), image_card(image_size is not None, image_size and int(image_size))]
        parameters = await self._model_parameters(replica, LLM.name) if text else None
        if parameters is not None:
            cards.insert(0, text_card(parameters.get("served_model_name") or DEFAULT_MODEL_NAME,
                                      int(parameters["max_context"]), int(parameters["max_running_sequences"])))
        return cards

    async def _model_parameters(self, replica: Replica, model: str) -> dict[str, str] | None:
        """A model's config parameters (written by `amserve export`, the same on every replica), read
        once; None if the replica cannot say now."""
        if model not in self._parameters:
            try:
                config = await replica.client.get_model_config(model, as_json=True, client_timeout=self.ready_timeout)
                self._parameters[model] = {key: value.get("string_value", "")
                                           for key, value in config["config"].get("parameters", {}).items()}
            except (InferenceServerException, KeyError):
                return None
        return self._parameters[model]

    async def complete_image(self, image: np.ndarray, missing: np.ndarray, steps: int | None
                             ) -> tuple[np.ndarray, np.ndarray]:
        answer = await self._infer(ENERGY_TRANSFORMER, et_wire.request_arrays(image, missing, steps),
                                   ("IMAGE", "ENERGY_TRACE"), failover=True)
        return answer.as_numpy("IMAGE")[0], answer.as_numpy("ENERGY_TRACE")[0]

    async def explain_image(self, image: np.ndarray, missing: np.ndarray, steps: int | None
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        outputs = ("FRAMES", "ATTENTION_ENERGY", "HOPFIELD_ENERGY")
        answer = await self._infer(ENERGY_TRANSFORMER, et_wire.request_arrays(image, missing, steps, explain=True),
                                   outputs, failover=True)
        frames, attention, hopfield = (answer.as_numpy(name)[0] for name in outputs)
        return frames, attention, hopfield

    async def explain_text(self, prompt: str, params: SamplingParams, top_n: int, layers: list[int] | None,
                           heads: list[int] | None, max_weights: int) -> tuple[str, TextExplanation]:
        """The llm model's own forward pass, asked over its stream: one final explanation event."""
        request = {"model_name": LLM.name, "outputs": [InferRequestedOutput("TOKEN")], "inputs": _inputs(
            LLM, llm_wire.explain_arrays(prompt, params, top_n, layers, heads, max_weights))}
        async with contextlib.aclosing(self._events(self._in_turn()[0].client, request)) as events:
            event = await anext(events)
        return llm_wire.decode_explanation(event)

    async def generate(self, prompt: Prompt, params: SamplingParams, deadline: float | None) -> AsyncIterator[dict]:
        """The generation's events, from a gRPC stream of its own to the decoupled `llm` model.

        Triton answers a refusal (a too-long prompt, a full queue) as the stream's first response, so
        it is raised by the first `anext`, before any token; the API layer takes that first event
        before it answers. The stream opens at that first `anext`: an event stream never iterated
        sends nothing and holds nothing."""
        request = {"model_name": LLM.name, "outputs": [InferRequestedOutput("TOKEN")],
                   "inputs": _inputs(LLM, llm_wire.request_arrays(prompt, params, deadline))}
        return self._events(self._in_turn()[0].client, request)

    async def _events(self, client: triton_aio.InferenceServerClient, request: dict) -> AsyncIterator[dict]:
        answered = asyncio.Event()  # ends the request stream (a half-close) once the answers are over

        async def requests():
            yield request
            await answered.wait()

        try:
            responses = client.stream_infer(requests())
        except InferenceServerException as exc:
            raise generation_error(service_error(exc, LLM.name)) from None
        state, finished = "waiting", False
        self._generations[state] += 1
        try:
            while not finished:
                try:
                    result, error = await anext(responses)
                except StopAsyncIteration:
                    raise Unavailable("Triton ended the generation stream before its last event") from None
                except grpc.RpcError as exc:
                    raise Unavailable(f"Triton cannot serve {LLM.name} now: {exc.details()}") from None
                if error is not None:  # an error response is the stream's last
                    finished = True
                    raise generation_error(service_error(error, LLM.name))
                event = llm_wire.decode_event(result.as_numpy("TOKEN"))
                finished = event["type"] in ("finish", "explanation")
                if state == "waiting" and not finished:
                    self._generations["waiting"] -= 1
                    self._generations["running"] += 1
                    state = "running"
                yield event
        finally:
            self._generations[state] -= 1
            answered.set()
            if not finished:  # the consumer went away (or Triton failed): cancel the gRPC stream
                responses.cancel()

    # ----- operations ---------------------------------------------------------------------------
    # Writes go to the shared store through this gateway's writer when there is one (the replicas
    # follow), else to the one Triton, which commits them to its own store. Reads go to the replicas.

    async def create_bank(self, name: str, kind: str, dim: int, params: dict) -> BankInfo:
        self._banks.pop(name, None)
        if self.writer is not None:
            return self._placed(await self._write(self.writer.create, name, kind, dim, params))
        return self._placed(memory_wire.bank_info(
            await self._call("create", name, {"kind": kind, "dim": dim, "params": params})))

    async def list_banks(self) -> list[BankInfo]:
        return [self._placed(memory_wire.bank_info(info)) for info in await self._call("list")]

    async def bank_info(self, name: str, min_version: int = 0) -> BankInfo:
        args = {"min_version": min_version} if min_version else None
        info = self._placed(memory_wire.bank_info(await self._call("info", name, args)))
        self._banks[name] = info
        return info

    async def bank_fidelity(self, name: str, sample_size: int, noise: float) -> Fidelity:
        return Fidelity.model_validate(await self._call("fidelity", name, {"sample_size": sample_size, "noise": noise}))

    def _placed(self, info: BankInfo) -> BankInfo:
        """The bank's shards with the replicas that serve them by url (a replica knows only its index)."""
        sharded = len(info.shards) > 1
        for shard in info.shards:
            shard.replicas = [self.urls[i] for i in (replicas_of(shard.shard, len(self.urls)) if sharded
                                                     else range(len(self.urls)))]
        return info

    async def delete_bank(self, name: str) -> None:
        self._banks.pop(name, None)
        if self.writer is not None:
            return await self._write(self.writer.delete, name)
        await self._call("delete", name)

    async def store(self, name: str, patterns: np.ndarray, ids: list[str] | None) -> tuple[list[str], int, int]:
        if self.writer is not None:
            return await self._write(self.writer.store_patterns, name, patterns, ids)
        result = await self._call("store", name, {"ids": ids}, vectors=patterns)
        return result["ids"], result["count"], result["version"]

    async def delete_pattern(self, name: str, pattern_id: str) -> int:
        if self.writer is not None:
            return await self._write(self.writer.delete_pattern, name, pattern_id)
        return (await self._call("delete_pattern", name, {"id": pattern_id}))["version"]

    async def run_memory(self, name: str, queries: np.ndarray, clamp: np.ndarray | None,
                         options: DynamicsOptions, min_version: int = 0) -> MemoryResults:
        """One Triton request, or for a bank sharded over several replicas the dynamics here, each
        evaluation a fan-out of one partial request per shard (service/engines/memory/shards.py)."""
        info = self._banks.get(name) or await self.bank_info(name, min_version)
        try:
            try:  # each request alone, before batching
                x, mask = checked_queries(BankRecord(info.name, info.kind, info.dim, info.params), queries, clamp)
            except InvalidArgument:  # against the bank as it is now: it may have been re-created elsewhere
                info = await self.bank_info(name, min_version)
                x, mask = checked_queries(BankRecord(info.name, info.kind, info.dim, info.params), queries, clamp)
            # A sharded bank over several replicas runs its dynamics here; in one Triton, all of it there.
            runs = self._sharded_runs if len(info.shards) > 1 and len(self._replicas) > 1 else self._runs
            return await runs.submit((name, options), (info, x, mask, min_version), rows=len(x))
        except ServiceError:  # the bank may have been re-created with other shards: ask again next time
            self._banks.pop(name, None)
            raise

    async def _run_batch(self, key: tuple[str, DynamicsOptions], parts: list[tuple]) -> list[MemoryResults]:
        """A batch of checked requests on one unsharded bank: one run request to Triton."""
        name, options = key
        x, mask = stacked([(queries, clamp) for _, queries, clamp, _ in parts])
        args = {**asdict(options), "min_version": max(part[3] for part in parts)}
        arrays = memory_wire.request_arrays("run", name, args, vectors=x.numpy(),
                                            clamp=None if mask is None else mask.numpy())
        answer = await self._infer(ASSOCIATIVE_MEMORY, arrays, memory_wire.RUN_OUTPUTS, failover=True)
        results = memory_wire.decode_results({name: answer.as_numpy(name)[0] for name in memory_wire.RUN_OUTPUTS})
        return results.split([len(queries) for _, queries, _, _ in parts])

    def _run_sharded(self, key: tuple[str, DynamicsOptions], parts: list[tuple]) -> list[MemoryResults]:
        """A batch of checked requests on one sharded bank, in a worker thread: the dynamics run here and
        each evaluation blocks the thread on one fan-out for the whole batch, which runs on the event
        loop. The shards' nearest ids collect in `labels`, which the merged rows index."""
        options = key[1]
        info = parts[0][0]
        min_version = max(part[3] for part in parts)
        x, mask = stacked([(queries, clamp) for _, queries, clamp, _ in parts])
        front = make_engine(info.kind, info.dim, info.params)
        labels: list[str | None] = []
        front.fan_out(lambda states: asyncio.run_coroutine_threadsafe(
            self._fan_out(info, states.numpy(), min_version, labels), self._loop).result(FAN_OUT_TIMEOUT_S))
        out = front.run(x, clamp=mask, steps=options.steps, step_size=options.step_size,
                        tolerance=options.tolerance, trace=options.trace, explain=options.explain)
        results = results_of(out, [labels[row] if row >= 0 else None for row in out.nearest.tolist()])
        return results.split([len(queries) for _, queries, _, _ in parts])

    async def _fan_out(self, info: BankInfo, states: np.ndarray, min_version: int, labels: list) -> list[Partial]:
        shards = len(info.shards)
        answers = await asyncio.gather(*(self._partial(info.name, shard, shards, states, min_version)
                                         for shard in range(shards)))
        return [memory_wire.decode_partial(answer, shard, labels) for shard, answer in enumerate(answers)]

    async def _partial(self, name: str, shard: int, shards: int, states: np.ndarray, min_version: int
                       ) -> dict[str, np.ndarray]:
        """Shard `shard`'s partial from the first of its replicas that answers; none: 503 naming the shard."""
        arrays = memory_wire.request_arrays("partial", name, {"shard": shard, "shards": shards,
                                                              "min_version": min_version}, vectors=states)
        replicas = sorted((self._replicas[i] for i in replicas_of(shard, len(self._replicas))), key=Replica.suspect)
        try:
            answer = await self._infer(ASSOCIATIVE_MEMORY, arrays, memory_wire.PARTIAL_OUTPUTS, replicas=replicas)
        except (Unavailable, Overloaded) as exc:
            raise Unavailable(f"shard {shard} of bank '{name}' has no live replica "
                              f"({', '.join(r.url for r in replicas)}): {exc.message}") from None
        return {output: answer.as_numpy(output)[0] for output in memory_wire.PARTIAL_OUTPUTS}

    async def _write(self, commit, *args):
        """A write committed by this gateway's writer, off the event loop; a store that cannot answer
        marks it degraded until a write goes through again."""
        try:
            result = await asyncio.to_thread(commit, *args)
        except Unavailable:
            self._store_failed = True
            raise
        self._store_failed = False
        return result

    # ----- the wire -----------------------------------------------------------------------------

    async def _call(self, op: str, bank: str = "", args: dict | None = None, *,
                    vectors: np.ndarray | None = None) -> Any:
        """A bank operation other than run: its JSON RESULT. Reads may fail over to another replica;
        writes reach Triton only where it is the one replica, and are never sent twice."""
        answer = await self._infer(ASSOCIATIVE_MEMORY, memory_wire.request_arrays(op, bank, args, vectors=vectors),
                                   ("RESULT",), failover=op in memory_wire.READ_OPS)
        return json.loads(answer.as_numpy("RESULT")[0, 0])

    async def _infer(self, spec: ModelSpec, arrays: dict[str, np.ndarray], outputs: tuple[str, ...], *,
                     failover: bool = False, replicas: list[Replica] | None = None):
        """One request to a replica; with `failover`, a replica that cannot serve it now (down, lagging,
        its queue full) is marked and the next one tried, so a client sees an error only when every
        replica failed. `replicas`: those to try, in order, rather than every replica in turn."""
        inputs = _inputs(spec, arrays)
        requested = [InferRequestedOutput(name) for name in outputs]
        if replicas is None:
            replicas = self._in_turn() if failover else self._in_turn()[:1]
        for attempt, replica in enumerate(replicas, start=1):
            try:
                return await replica.client.infer(spec.name, inputs, outputs=requested,
                                                  client_timeout=self.request_timeout)
            except InferenceServerException as exc:
                error = service_error(exc, spec.name)
                if not isinstance(error, (Unavailable, Overloaded)) or attempt == len(replicas):
                    raise error from None
                replica.failed_at = time.monotonic()


def _inputs(spec: ModelSpec, arrays: dict[str, np.ndarray]) -> list[InferInput]:
    """The request's arrays (batch dimension included) as inputs typed by the model's spec."""
    inputs = []
    for name, array in arrays.items():
        tensor = InferInput(name, list(array.shape), spec.input(name).wire_type)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs
