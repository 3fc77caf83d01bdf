"""Chunks of files for worker processes, their results taken back in order (dindex, danon).

With one job the work runs in this process. With more, a process pool does it and at most
two chunks per worker are in flight, so memory stays bounded however many files come.
Ctrl-C and SIGTERM belong to the parent: it shuts the pool down, and a worker whose parent
is killed outright dies with it.
"""

from __future__ import annotations

import os
import signal
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Callable

FORK_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def worker_init(parent: int) -> None:
    """A worker's first step (the pool's initializer, or the start of one)."""
    # Ctrl-C and SIGTERM are the parent's to handle; it shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORK_SIGNALS)  # blocked by the parent around fork
    # A parent killed with SIGKILL cannot shut the pool down: die with it instead of
    # waiting forever for work (Linux; elsewhere the pool's own checks apply).
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


class Chunks:
    """Submit ``fn(arg)`` for a chunk of ``items``; take back ``(items, results)`` in order."""

    def __init__(self, jobs: int, initializer: Callable[..., None], initargs: tuple):
        self.jobs = jobs
        self.initializer = initializer
        self.initargs = initargs
        self.pool: ProcessPoolExecutor | None = None
        self.inflight: deque[tuple[list, Future]] = deque()

    def submit(self, fn: Callable[[Any], list], items: list, arg: Any) -> None:
        if self.jobs > 1:
            if self.pool is None:
                self.pool = ProcessPoolExecutor(max_workers=self.jobs, initializer=self.initializer,
                                                initargs=self.initargs)
            # The pool forks inside submit. A signal handler that raises there lands in
            # logging's fork hooks, which swallow the exception: hold signals until after.
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORK_SIGNALS)
            try:
                fut = self.pool.submit(fn, arg)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        else:
            fut = Future()
            fut.set_result(fn(arg))
        self.inflight.append((items, fut))

    @property
    def full(self) -> bool:
        """More chunks in flight than the workers need to stay busy: take one back first."""
        return len(self.inflight) > 2 * self.jobs

    def __bool__(self) -> bool:
        return bool(self.inflight)

    def next(self) -> tuple[list, list]:
        """The oldest chunk's items and results (waiting for them)."""
        items, fut = self.inflight.popleft()
        return items, fut.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
