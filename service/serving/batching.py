"""Dynamic micro-batching for the embedded backend, with the knobs of Triton's dynamic batcher.

Requests with the same key (bank and dynamics options) wait up to `max_queue_delay_us` for company, then
up to `max_batch_size` query rows go to the engine as one call. While the engine is busy, new requests
queue up, so batches grow with load on their own. The queue is bounded: past `max_queue_size` waiting
requests, `submit` raises Overloaded at once instead of letting latency grow without limit.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from service import metrics
from service.errors import Overloaded


@dataclass
class _Pending:
    item: Any
    rows: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class _Queue:
    """One key's waiting requests, oldest first."""

    pending: deque[_Pending] = field(default_factory=deque)
    rows: int = 0


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
        self.max_concurrent_batches = max_concurrent_batches
        self._model = model
        # This model's series, looked up once: a labels() call costs more than the observation.
        self._queue_depth, self._queue_wait = metrics.QUEUE_DEPTH.labels(model), metrics.QUEUE_WAIT.labels(model)
        self._batch_size, self._batch_rows = metrics.BATCH_SIZE.labels(model), metrics.BATCH_ROWS.labels(model)
        self._queues: OrderedDict[Hashable, _Queue] = OrderedDict()
        self._waiting = 0
        self._in_progress: set[asyncio.Future] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Bind to the running loop, which runs every batch's dispatch and delivery."""
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        """Stop dispatching; batches in progress are cancelled (their requests with them)."""
        self._loop = None
        if self._timer is not None:
            self._timer.cancel()
        runs = list(self._in_progress)
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)

    async def submit(self, key: Hashable, item: Any, rows: int) -> Any:
        if self._waiting >= self.max_queue_size:
            metrics.REJECTIONS.labels(reason="queue_full").inc()
            raise Overloaded(f"the {self._model} queue is full ({self.max_queue_size} waiting requests)")
        pending = _Pending(item, rows, asyncio.get_running_loop().create_future())
        queue = self._queues.setdefault(key, _Queue())
        queue.pending.append(pending)
        queue.rows += rows
        self._waiting += 1
        self._queue_depth.set(self._waiting)
        self._dispatch()
        return await pending.future

    def _dispatch(self) -> None:
        """Start batches while a slot is free, oldest key first (no starvation). A key's queue goes when
        it holds a full batch or its oldest request has waited the queue delay; until then a timer
        calls back at that moment."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._loop is not None and self._queues and len(self._in_progress) < self.max_concurrent_batches:
            key, queue = next(iter(self._queues.items()))
            wait = queue.pending[0].enqueued + self.max_queue_delay - time.perf_counter()
            if queue.rows < self.max_batch_size and wait > 0:
                self._timer = self._loop.call_later(wait, self._dispatch)
                return
            batch = self._take(key, queue)
            if batch:
                self._start(key, batch)

    def _take(self, key: Hashable, queue: _Queue) -> list[_Pending]:
        batch, rows = [], 0
        while queue.pending and (not batch or rows + queue.pending[0].rows <= self.max_batch_size):
            pending = queue.pending.popleft()
            queue.rows -= pending.rows
            self._waiting -= 1
            if not pending.future.cancelled():  # the client went away while waiting
                batch.append(pending)
                rows += pending.rows
        if queue.pending:
            self._queues.move_to_end(key)
        else:
            del self._queues[key]
        self._queue_depth.set(self._waiting)
        return batch

    def _start(self, key: Hashable, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        for pending in batch:
            self._queue_wait.observe(started - pending.enqueued)
        self._batch_size.observe(len(batch))
        self._batch_rows.observe(sum(p.rows for p in batch))
        items = [p.item for p in batch]
        if self._executor is None:
            run = asyncio.ensure_future(self._run_batch(key, items))
        else:  # submitted to the executor now, not at the loop's next turn
            run = self._loop.run_in_executor(self._executor, self._run_batch, key, items)
        self._in_progress.add(run)
        run.add_done_callback(functools.partial(self._finished, batch))

    def _finished(self, batch: list[_Pending], run: asyncio.Future) -> None:
        self._in_progress.discard(run)
        # The next batch starts before this one's requests resume: the engine then runs while the loop
        # answers them and reads their clients' next requests, rather than after.
        self._dispatch()
        if run.cancelled():
            for pending in batch:
                pending.future.cancel()
        elif (error := run.exception()) is not None:  # handed to every request of the batch
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
        else:
            for pending, result in zip(batch, run.result()):
                if not pending.future.done():
                    pending.future.set_result(result)
