"""Running batches of work on a few threads, results in order (the work is torch ops, which release the GIL)."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

MAX_WORKERS = 4
Job = TypeVar("Job")
Result = TypeVar("Result")


def workers(device: str) -> int:
    """How many batches to work on at once: on the CPU, the cores torch's own threads leave free (at most
    MAX_WORKERS); on a GPU, one.

    Per batch the work is small (``[r, r]`` eigenproblems, thin products), so several batches on one
    thread each use the cores better than one batch on several threads. A GPU runs one batch's kernels
    at a time anyway, and torch's lazy set-up of CUDA linear algebra fails when two threads start it."""
    if device != "cpu":
        return 1
    return max(1, min(MAX_WORKERS, (os.cpu_count() or 1) // torch.get_num_threads()))


def in_order(function: Callable[[Job], Result], jobs: Iterable[Job], threads: int) -> Iterator[Result]:
    """``map(function, jobs)`` on ``threads`` threads, in order, with at most ``2 * threads`` jobs taken ahead."""
    if threads == 1:
        yield from map(function, jobs)
        return
    # OpenMP thread counts are per thread: a new thread would start with one per core, not the caller's.
    with ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),)) as pool:
        pending: deque[Future[Result]] = deque()
        try:
            for job in jobs:
                pending.append(pool.submit(function, job))
                if len(pending) == 2 * threads:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
