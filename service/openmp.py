"""torch's OpenMP threads: one pool per thread that runs parallel work, and what that costs.

Every thread that runs a parallel torch operation gets a pool of OpenMP workers of its own (libgomp,
bundled with torch), kept for the thread's life. Once libgomp manages more threads than the
process has CPUs, it cuts its workers' spin-wait to 1,000 spins whatever GOMP_SPINCOUNT says, so
after every parallel region they sleep and are woken by futex. On 2 cores a second pool is enough:
the default model's decode step took 9.8-10.4 ms in the scheduler's thread once the thread that
loaded it held a pool, against 7.8-8.3 ms without; the scheduler alone made 93-94 tokens/s of one
stream, 114-118 with the loading thread's pool released. So threads that run torch only now and then (loading, writes) release their pool when done,
and the scheduler releases its own whenever it runs out of work.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")
OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep what can be kept


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The libgomp torch loaded (its own copy in torch/lib), or None for a torch without one."""
    import torch

    path = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    try:
        return ctypes.CDLL(str(path)) if path.is_file() else None
    except OSError:
        return None


def release_pool() -> bool:
    """End the calling thread's OpenMP workers (the next parallel operation in this thread starts
    new ones). False where there is nothing to call, or inside a parallel region."""
    library = _libgomp()
    return library is not None and library.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0


def releasing_pool(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn`, then `release_pool()` in the thread that ran it: for work that runs now and then."""
    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        finally:
            release_pool()
    return run
