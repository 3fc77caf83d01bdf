"""The streaming machinery of sealing and opening: worker threads, buffer rings and early writeback.

Sealing and opening a 1 GiB envelope must run at the speed of AES-GCM and SHA-256 with
constant memory; these pieces let hashing, writing and fsync run beside the cipher.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import IO, Callable

from ..errors import InputError

class Stage:
    """A worker thread that runs submitted calls in order (hashing, writing).

    SHA-256 and file writes release the GIL, so a stage runs beside AES on another core.
    The queue is bounded, so memory stays constant. After a failure the stage still runs
    the calls marked ``always`` (buffer releases), so the main thread never waits forever.
    """

    _STOP = object()

    def __init__(self, name: str, depth: int = 8):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.q.get()
            if item is self._STOP:
                return
            fn, args, always = item
            if self.error is not None and not always:
                continue
            try:
                fn(*args)
            except BaseException as exc:  # handed to the main thread at the next submit/close
                if self.error is None:
                    self.error = exc

    def submit(self, fn: Callable, *args, always: bool = False) -> None:
        if self.error is not None and not always:
            raise self.error
        self.q.put((fn, args, always))

    def call(self, fn: Callable):
        """Run ``fn`` after everything submitted so far and return its result."""
        done = threading.Event()
        box: list = []
        self.submit(lambda: box.append(fn()))
        self.submit(done.set, always=True)
        done.wait()
        if self.error is not None:
            raise self.error
        return box[0]

    def close(self) -> None:
        self.q.put(self._STOP)
        self.thread.join()
        if self.error is not None:
            raise self.error

    def abort(self, wait: float = 2.0) -> None:
        """Stop after the current call. Waits at most ``wait`` seconds: an fsync stuck behind
        other processes' writes must not hold up Ctrl-C or SIGTERM. A call still running
        touches only its own open file, which the caller's cleanup unlinks."""
        if self.thread.is_alive():
            self.error = self.error or InputError("aborted")
            try:  # drop what is queued so the stop marker fits
                while True:
                    self.q.get_nowait()
            except queue.Empty:
                pass
            try:
                self.q.put(self._STOP, timeout=wait)
            except queue.Full:
                return
            self.thread.join(wait)


def write_all(out: IO[bytes], view: memoryview) -> None:
    while view:  # an unbuffered write may be partial
        n = out.write(view)
        view = view[n:]


class Ring:
    """Reusable chunk buffers. Fresh 1 MiB allocations cost page faults on every chunk;
    a buffer returns to the ring only when the stage that reads it is done with it."""

    def __init__(self, count: int, size: int):
        self.bufs = [bytearray(size) for _ in range(count)]
        self.views = [memoryview(b) for b in self.bufs]
        self.free: queue.Queue = queue.Queue()
        for i in range(count):
            self.free.put(i)

    def take(self) -> tuple[int, memoryview]:
        i = self.free.get()
        return i, self.views[i]

    def give(self, i: int) -> None:
        self.free.put(i)


RING = 6  # buffers per ring: stage queue depth and what is in flight
SYNC_DEPTH = 16  # written files (open descriptors, no buffers) waiting for their fsync
FLUSH_EVERY = 32 << 20  # bytes written to a file between two early writebacks


class Flusher:
    """Early writeback of a file being written, so that its final fsync finds little left.

    Writing 1 GiB and then calling fsync waits for the whole writeback at the end; a
    ``fdatasync`` every FLUSH_EVERY bytes, on its own thread, lets the disk work while the
    CPU encrypts and hashes. It never replaces the final fsync: it only makes it short.
    ``wrote`` is called by one thread only; at most one writeback waits behind the running one.
    """

    def __init__(self, fd: int | None, stage: Stage | None = None, every: int | None = None):
        self.fd = fd
        self.own = stage is None and fd is not None
        self.stage = Stage("dseal-flush", 2) if self.own else stage
        self.every = FLUSH_EVERY if every is None else every
        self.pending = 0

    @classmethod
    def for_file(cls, out: IO[bytes]) -> "Flusher":
        try:
            fd = out.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
            fd = None
        return cls(fd)

    def wrote(self, n: int, fd: int | None = None) -> None:
        fd = self.fd if fd is None else fd
        if self.stage is None or fd is None:
            return
        self.pending += n
        if self.pending >= self.every and self.stage.q.empty():
            self.pending = 0
            self.stage.submit(early_writeback, fd)

    def reset(self) -> None:
        self.pending = 0

    def close(self) -> None:
        if self.own and self.stage is not None:
            self.stage.close()

    def abort(self) -> None:
        if self.own and self.stage is not None:
            self.stage.abort()


def drop_cached(fd: int) -> None:
    """Let the kernel drop the (clean, fsynced) cached pages of a file just written.

    An archive receives studies for keeping, not for reading right away: without this a
    1 GiB envelope pushes 1 GiB of other cached data out, and every page of it is a fresh
    allocation. Dropped pages go straight back to the next files. Advice only: any
    failure is ignored.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        try:
            advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass


def early_writeback(fd: int) -> None:
    getattr(os, "fdatasync", os.fsync)(fd)


