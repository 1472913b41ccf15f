"""OpenMP worker pools: a thread that runs parallel torch work gets workers of its own, and
`release_pool` ends them; the scheduler releases its pool whenever it runs out of work."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from service.openmp import release_pool, releasing_pool
from service.serving.scheduler import GenerationRequest
from tests.helpers import wait_until
from tests.serving.test_scheduler import GREEDY, EventLog, make_scheduler, model, tokenizer  # noqa: F401 - fixtures

PARALLEL = 2  # workers per pool under test: the caller and one more


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def parallel_work() -> None:
    torch.set_num_threads(PARALLEL)
    torch.randn(4_000_000).exp_().sum()  # well above torch's grain size: runs in an OpenMP region


@pytest.fixture()
def worker():
    with ThreadPoolExecutor(1) as executor:
        executor.submit(parallel_work).result()  # what torch starts once per process is there from here on
        yield executor
        executor.submit(release_pool).result()


def test_release_pool_ends_the_threads_workers_and_parallel_work_starts_them_again(worker):
    with_workers = os_threads()
    assert worker.submit(release_pool).result() is True
    assert wait_until(lambda: os_threads() == with_workers - (PARALLEL - 1), timeout=5)
    worker.submit(parallel_work).result()
    assert os_threads() == with_workers


def test_releasing_pool_answers_the_function_and_releases_after_it(worker):
    with_workers = os_threads()

    def work(x: int) -> int:
        parallel_work()
        return x + 1

    assert worker.submit(releasing_pool(work), 41).result() == 42
    assert wait_until(lambda: os_threads() == with_workers - (PARALLEL - 1), timeout=5)


def test_the_scheduler_releases_its_pool_when_out_of_work(make_scheduler, monkeypatch):
    happened: list[str] = []  # in the order the scheduler thread did it
    monkeypatch.setattr("service.serving.scheduler.release_pool",
                        lambda: happened.append(f"release in {threading.current_thread().name}"))
    scheduler = make_scheduler(max_batch_size=2)
    assert wait_until(lambda: happened, timeout=5)  # idle from the start
    log = EventLog()
    log.hooks.append(lambda event: happened.append(type(event).__name__))
    log.wait(scheduler.submit(GenerationRequest("Hello", GREEDY), log))
    # idle again once the request is done, and not while it ran
    assert wait_until(lambda: happened[-1].startswith("release"), timeout=5)
    finished = happened.index("FinishEvent")
    assert "release in lm-scheduler" in happened[finished:]
    assert not any(step.startswith("release") for step in happened[happened.index("TokenEvent"):finished])
    assert {step for step in happened if step.startswith("release")} == {"release in lm-scheduler"}
