"""Dynamic micro-batching for the embedded backend, with the knobs of Triton's dynamic batcher.

Requests with the same key (bank and dynamics options) wait up to `max_queue_delay_us` for company, then
up to `max_batch_size` query rows go to the engine as one call. While the engine is busy, new requests
queue up, so batches grow with load on their own. The queue is bounded: past `max_queue_size` waiting
requests, `submit` raises Overloaded at once instead of letting latency grow without limit.

When a batch finishes, its slot is freed before its answers are handed out, so the dispatcher resumes
ahead of the finished batch's requests: a batch that is ready goes to the engine while the loop writes
their responses, rather than after. The wait for company counts from that moment too (not only from the
oldest request's arrival): the requests that queued up while the engine was busy would otherwise leave
at once, as a batch of the few whose clients happened to be quick, and the engine would alternate full
and near-empty calls.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from service import metrics
from service.errors import Overloaded


# The batchers open per model label (the Triton backend keeps two, sharded and unsharded runs): the
# queue-depth gauge of a model is their waiting requests together.
_OPEN: dict[str, weakref.WeakSet] = {}


@dataclass
class _Pending:
    item: Any
    rows: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(
        self,
        run_batch: Callable[[Hashable, list[Any]], Sequence[Any] | Awaitable[Sequence[Any]]],
        *,
        executor: Executor | None,
        max_batch_size: int = 64,
        max_queue_delay_us: int = 500,
        max_queue_size: int = 1024,
        max_concurrent_batches: int = 1,
        model: str = "associative_memory",
    ):
        """`run_batch(key, items)` runs in `executor` (or, without one, is a coroutine function awaited
        on the loop) and returns one result per item, or raises; an exception fails every request of
        that batch. Up to `max_concurrent_batches` batches run at once: one where they share one engine,
        more where the batches go to servers that overlap them (Triton's instances and replicas)."""
        self._run_batch = run_batch
        self._executor = executor
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay_us / 1e6
        self.max_queue_size = max_queue_size
        self._model = model
        # This model's series, looked up once: a labels() call costs more than the observation.
        self._queue_wait = metrics.QUEUE_WAIT.labels(model)
        self._batch_size, self._batch_rows = metrics.BATCH_SIZE.labels(model), metrics.BATCH_ROWS.labels(model)
        self._queues: OrderedDict[Hashable, deque[_Pending]] = OrderedDict()
        self._waiting = 0
        # Read when scraped: a set() per request and per batch would take the gauge's lock each time.
        open_batchers = _OPEN.setdefault(model, weakref.WeakSet())
        open_batchers.add(self)
        metrics.QUEUE_DEPTH.labels(model).set_function(lambda: sum(b._waiting for b in open_batchers))
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._free = asyncio.Semaphore(max_concurrent_batches)
        self._running: set[asyncio.Future] = set()
        self._freed_at = 0.0  # when a batch slot last became free

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._dispatch_forever())

    async def close(self) -> None:
        _OPEN[self._model].discard(self)
        tasks = [task for task in (self._task, *self._running) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def submit(self, key: Hashable, item: Any, rows: int) -> Any:
        if self._waiting >= self.max_queue_size:
            metrics.REJECTIONS.labels(reason="queue_full").inc()
            raise Overloaded(f"the {self._model} queue is full ({self.max_queue_size} waiting requests)")
        pending = _Pending(item, rows, asyncio.get_running_loop().create_future())
        self._queues.setdefault(key, deque()).append(pending)
        self._waiting += 1
        self._wakeup.set()
        return await pending.future

    async def _dispatch_forever(self) -> None:
        while True:
            await self._free.acquire()  # while every batch slot is busy, the waiting requests add up
            await self._dispatch_one()

    async def _dispatch_one(self) -> None:
        """Wait for requests, then for company up to the queue delay, and start one batch."""
        while True:
            if not self._queues:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            key, queue = next(iter(self._queues.items()))  # oldest key first: no starvation
            deadline = max(queue[0].enqueued, self._freed_at) + self.max_queue_delay
            while sum(p.rows for p in queue) < self.max_batch_size and (delay := deadline - time.perf_counter()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), delay)
                except TimeoutError:
                    break
            batch = self._take(key, queue)
            if batch:
                self._start(key, batch)
                return

    def _take(self, key: Hashable, queue: deque[_Pending]) -> list[_Pending]:
        batch, rows = [], 0
        while queue and (not batch or rows + queue[0].rows <= self.max_batch_size):
            pending = queue.popleft()
            self._waiting -= 1
            if not pending.future.cancelled():  # the client went away while waiting
                batch.append(pending)
                rows += pending.rows
        if queue:
            self._queues.move_to_end(key)
        else:
            del self._queues[key]
        return batch

    def _start(self, key: Hashable, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        for pending in batch:
            self._queue_wait.observe(started - pending.enqueued)
        self._batch_size.observe(len(batch))
        self._batch_rows.observe(sum(p.rows for p in batch))
        items = [p.item for p in batch]
        if self._executor is None:
            work = asyncio.ensure_future(self._run_batch(key, items))
        else:  # submitted now, not from a task that would first wait its turn on the loop
            work = asyncio.get_running_loop().run_in_executor(self._executor, self._run_batch, key, items)
        self._running.add(work)
        work.add_done_callback(lambda done: self._answer(batch, done))

    def _answer(self, batch: list[_Pending], work: asyncio.Future) -> None:
        self._running.discard(work)
        self._freed_at = time.perf_counter()
        self._free.release()  # first: the dispatcher resumes ahead of the answered requests
        if work.cancelled():
            return
        error = work.exception()
        if error is not None:  # handed to every waiting request of the batch
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            return
        for pending, result in zip(batch, work.result()):
            if not pending.future.done():
                pending.future.set_result(result)
