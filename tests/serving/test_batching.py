"""MicroBatcher: merging, row limit, bounded queue, per-request results, errors, cancelled waiters."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import REGISTRY

from service.errors import Overloaded
from service.serving.batching import MicroBatcher


class Recorder:
    def __init__(self, delay: float = 0.0):
        self.calls: list[tuple] = []
        self.delay = delay
        self.release = threading.Event()
        self.release.set()

    def __call__(self, key, items):
        self.release.wait(10)
        self.calls.append((key, list(items)))
        if any(item == "boom" for item in items):
            raise RuntimeError("engine failed")
        return [(key, item * 2) for item in items]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_with_one_key_share_a_call_and_get_their_own_results():
    recorder = Recorder()

    async def scenario():
        batcher = MicroBatcher(recorder, executor=ThreadPoolExecutor(1), max_batch_size=64, max_queue_delay_us=20_000)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit("k", i, rows=1) for i in range(10)))
        await batcher.close()
        return results

    assert run(scenario()) == [("k", 2 * i) for i in range(10)]
    assert len(recorder.calls) == 1 and recorder.calls[0][1] == list(range(10))


def test_different_keys_never_share_a_call():
    recorder = Recorder()

    async def scenario():
        batcher = MicroBatcher(recorder, executor=ThreadPoolExecutor(1), max_batch_size=64, max_queue_delay_us=20_000)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(i % 3, i, rows=1) for i in range(9)))
        await batcher.close()
        return results

    assert run(scenario()) == [(i % 3, 2 * i) for i in range(9)]
    assert sorted(len(items) for _, items in recorder.calls) == [3, 3, 3]
    assert all(len({item % 3 for item in items}) == 1 for _, items in recorder.calls)


def test_batches_respect_the_row_limit():
    recorder = Recorder()

    async def scenario():
        batcher = MicroBatcher(recorder, executor=ThreadPoolExecutor(1), max_batch_size=8, max_queue_delay_us=20_000)
        batcher.start()
        await asyncio.gather(*(batcher.submit("k", i, rows=3) for i in range(7)))
        await batcher.close()

    run(scenario())
    assert all(3 * len(items) <= 8 for _, items in recorder.calls)
    assert sum(len(items) for _, items in recorder.calls) == 7


def test_full_queue_raises_overloaded_and_admitted_requests_complete():
    recorder = Recorder()
    recorder.release.clear()  # the engine is busy: requests pile up

    async def scenario():
        batcher = MicroBatcher(recorder, executor=ThreadPoolExecutor(1), max_batch_size=1, max_queue_delay_us=0,
                               max_queue_size=3)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit("k", 0, rows=1))
        await asyncio.sleep(0.05)  # taken by the engine, which blocks
        admitted = [asyncio.ensure_future(batcher.submit("k", i, rows=1)) for i in (1, 2, 3)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await batcher.submit("k", 4, rows=1)
        recorder.release.set()
        results = await asyncio.gather(first, *admitted)
        await batcher.close()
        return results

    assert run(scenario()) == [("k", 0), ("k", 2), ("k", 4), ("k", 6)]


def test_the_queue_depth_gauge_reads_the_waiting_requests_of_a_models_batchers_when_scraped():
    recorders = [Recorder(), Recorder()]
    for recorder in recorders:
        recorder.release.clear()

    def depth() -> float:
        return REGISTRY.get_sample_value("amserve_queue_depth", {"model": "depth-test"})

    async def scenario():
        # Two batchers of one model, as the Triton backend keeps for sharded and unsharded runs.
        batchers = [MicroBatcher(recorder, executor=ThreadPoolExecutor(1), max_batch_size=1, max_queue_delay_us=0,
                                 model="depth-test") for recorder in recorders]
        for batcher in batchers:
            batcher.start()
        first = [asyncio.ensure_future(batcher.submit("k", 0, rows=1)) for batcher in batchers]
        await asyncio.sleep(0.05)  # taken by the engines, which block
        waiting = [asyncio.ensure_future(batchers[0].submit("k", i, rows=1)) for i in (1, 2, 3)]
        waiting.append(asyncio.ensure_future(batchers[1].submit("k", 4, rows=1)))
        await asyncio.sleep(0)
        depths = [depth()]
        for recorder in recorders:
            recorder.release.set()
        await asyncio.gather(*first, *waiting)
        depths.append(depth())
        for batcher in batchers:
            await batcher.close()
        return depths

    assert run(scenario()) == [4, 0]


def test_engine_error_reaches_every_request_of_its_batch_only():
    recorder = Recorder()

    async def scenario():
        batcher = MicroBatcher(recorder, executor=ThreadPoolExecutor(1), max_batch_size=64, max_queue_delay_us=20_000)
        batcher.start()
        bad = await asyncio.gather(batcher.submit("a", "boom", rows=1), batcher.submit("a", 1, rows=1),
                                   return_exceptions=True)
        good = await batcher.submit("b", 5, rows=1)
        await batcher.close()
        return bad, good

    bad, good = run(scenario())
    assert all(isinstance(r, RuntimeError) for r in bad)
    assert good == ("b", 10)


def test_cancelled_waiters_are_skipped():
    recorder = Recorder()

    async def scenario():
        batcher = MicroBatcher(recorder, executor=ThreadPoolExecutor(1), max_batch_size=64, max_queue_delay_us=50_000)
        batcher.start()
        gone = asyncio.ensure_future(batcher.submit("k", 1, rows=1))
        stays = asyncio.ensure_future(batcher.submit("k", 2, rows=1))
        await asyncio.sleep(0)
        gone.cancel()
        result = await stays
        await batcher.close()
        return result

    assert run(scenario()) == ("k", 4)
    assert recorder.calls == [("k", [2])]


@pytest.mark.parametrize("slots", [1, 3])
def test_batches_in_progress_at_once_are_bounded_and_requests_wait_for_a_slot(slots):
    """With an async run_batch (no executor): at most `slots` batches run at once; while every slot is
    busy the waiting requests add up into the next batch."""
    running, most, release, calls = 0, 0, None, []

    async def run_batch(key, items):
        nonlocal running, most
        calls.append(list(items))
        running += 1
        most = max(most, running)
        await release.wait()
        running -= 1
        return [(key, item) for item in items]

    async def scenario():
        nonlocal release
        release = asyncio.Event()
        batcher = MicroBatcher(run_batch, executor=None, max_batch_size=64, max_queue_delay_us=1_000,
                               max_concurrent_batches=slots)
        batcher.start()
        first = [asyncio.ensure_future(batcher.submit(f"bank{i}", i, rows=1)) for i in range(5)]
        await asyncio.sleep(0.1)  # every slot taken, one batch per key
        started = most
        later = [asyncio.ensure_future(batcher.submit("bank0", 10 + i, rows=1)) for i in range(4)]
        await asyncio.sleep(0.05)
        release.set()
        results = await asyncio.gather(*first, *later)
        await batcher.close()
        return started, results

    started, results = run(scenario())
    assert started == slots and most == slots
    assert [10, 11, 12, 13] in calls  # they came while the slots were busy: one batch
    assert results == [(f"bank{i}", i) for i in range(5)] + [("bank0", 10 + i) for i in range(4)]


class RecordingExecutor(ThreadPoolExecutor):
    """One worker thread; notes on the loop's side when each batch is handed to it."""

    def __init__(self, events: list):
        super().__init__(1)
        self.events = events

    def submit(self, fn, key, items):
        self.events.append(("engine gets", list(items)))
        return super().submit(fn, key, items)


def test_the_next_batch_reaches_the_engine_before_the_finished_one_is_answered():
    """So that the engine computes it while the loop writes the finished batch's responses."""
    recorder, events = Recorder(), []
    recorder.release.clear()

    async def answered(batcher, item):
        result = await batcher.submit("k", item, rows=1)
        events.append(("answered", item))
        return result

    async def scenario():
        batcher = MicroBatcher(recorder, executor=RecordingExecutor(events), max_batch_size=64, max_queue_delay_us=0)
        batcher.start()
        first = asyncio.ensure_future(answered(batcher, 1))
        await asyncio.sleep(0.05)  # batch [1] is in the engine, held there
        second = asyncio.ensure_future(answered(batcher, 2))
        await asyncio.sleep(0.05)  # queued behind it
        recorder.release.set()
        results = await asyncio.gather(first, second)
        await batcher.close()
        return results

    assert run(scenario()) == [("k", 2), ("k", 4)]
    assert events.index(("engine gets", [2])) < events.index(("answered", 1))


def test_requests_that_queued_while_the_engine_was_busy_wait_for_company_after_it():
    """The queue delay counts from when the engine was free again, not only from each arrival: else
    the requests that piled up meanwhile would leave at once, without the ones about to arrive."""
    recorder = Recorder()
    recorder.release.clear()

    async def scenario():
        batcher = MicroBatcher(recorder, executor=ThreadPoolExecutor(1), max_batch_size=64, max_queue_delay_us=300_000)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit("k", 1, rows=1))
        await asyncio.sleep(0.35)  # its batch leaves after the delay, then holds the engine
        queued = asyncio.ensure_future(batcher.submit("k", 2, rows=1))
        await asyncio.sleep(0.35)  # past its own delay while the engine is busy
        recorder.release.set()
        await first
        await asyncio.sleep(0.03)
        late = asyncio.ensure_future(batcher.submit("k", 3, rows=1))
        results = await asyncio.gather(queued, late)
        await batcher.close()
        return results

    assert run(scenario()) == [("k", 4), ("k", 6)]
    assert [items for _, items in recorder.calls] == [[1], [2, 3]]
