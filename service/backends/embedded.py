"""Engines in the gateway process: banks from the local data dir, retrieve/complete micro-batched."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from service.batching import MicroBatcher
from service.engines.memory.persistence import SQLiteStore
from service.engines.memory.registry import BankInfo, BankRegistry, DynamicsOptions, MemoryResult


class EmbeddedBackend:
    name = "embedded"

    def __init__(self, data_dir, *, device: str = "cpu", max_batch_size: int = 64,
                 max_queue_delay_us: int = 500, max_queue_size: int = 1024):
        self._data_dir = data_dir
        self._device = device
        self._batching = dict(max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
                              max_queue_size=max_queue_size)
        # One engine thread: batches run back to back (like one Triton instance), each using all
        # cores through torch's intra-op threads. Writes use their own thread so a store never
        # waits behind a long retrieve batch.
        self._engine_thread = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="bank-writes")
        self.registry: BankRegistry | None = None
        self.batcher: MicroBatcher | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.registry = await loop.run_in_executor(
            self._write_thread, lambda: BankRegistry(SQLiteStore(self._data_dir), self._device))
        self.batcher = MicroBatcher(self._run_batch, executor=self._engine_thread, **self._batching)
        self.batcher.start()

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()
        self._engine_thread.shutdown(wait=True)
        self._write_thread.shutdown(wait=True)
        if self.registry is not None:
            self.registry.store.close()

    async def ready(self) -> bool:
        return self.registry is not None

    async def _write(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._write_thread, fn, *args)

    async def create_bank(self, name: str, kind: str, dim: int, params: dict) -> BankInfo:
        return await self._write(self.registry.create, name, kind, dim, params)

    async def list_banks(self) -> list[BankInfo]:
        return self.registry.list()

    async def bank_info(self, name: str) -> BankInfo:
        return self.registry.info(name)

    async def delete_bank(self, name: str) -> None:
        await self._write(self.registry.delete, name)

    async def store(self, name: str, patterns: np.ndarray, ids: list[str] | None) -> tuple[list[str], int]:
        return await self._write(self.registry.store_patterns, name, patterns, ids)

    async def delete_pattern(self, name: str, pattern_id: str) -> None:
        await self._write(self.registry.delete_pattern, name, pattern_id)

    async def run_memory(self, name: str, queries: np.ndarray, clamp: np.ndarray | None,
                         options: DynamicsOptions) -> list[MemoryResult]:
        part = self.registry.check_queries(name, queries, clamp)  # a bad request fails alone, not its batch
        return await self.batcher.submit((name, options.steps, options.step_size, options.tolerance,
                                          options.trace), part, rows=len(queries))

    def _run_batch(self, key: tuple, parts: list) -> list[list[MemoryResult]]:
        name = key[0]
        return self.registry.run_batch(name, parts, DynamicsOptions(*key[1:]))
