"""dserve's indexer (IndexWriter), and the child process it runs in (IndexProcess, main).

Indexing in a thread of dserve made every C-STORE wait for the GIL: each system call
of a store (write, fsync, rename) let the indexer thread in, and the store then waited
for it to let go. In a child process, the two only share the pipes between them:

- dserve to the indexer (its stdin): one frame per stored file, a 4-byte big-endian
  length and a pickle of ``(path, (attrs, transfer_syntax, text) or None, temporary or None)``;
- the indexer to dserve (its stdout): one JSON object per line, ``{"ready": true}`` or
  ``{"error": ...}`` once, then ``{"indexed": n}`` per batch, ``{"log": [level, message]}``,
  ``{"fatal": ...}``, and ``{"record": ...}`` per indexed file unless the indexer writes
  the records itself, to dserve's stdout, which it is then given.

The indexer ignores SIGINT and SIGTERM: dserve shuts it down by closing its stdin, after
the last store, and it then commits what it has and exits. If dserve is killed, the
same happens.
"""

from __future__ import annotations

import errno
import logging
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import orjson

from .. import records, security
from ..dicom.archive import fsync_dir, fsync_path, syncfs
from ..errors import DtoolsError

log = logging.getLogger("dtools")
_FRAME = struct.Struct(">I")


_STOP = object()
LINGER = 0.05  # seconds the indexer waits to fill a batch when it also syncs it
SHORT_LINGER = 0.005  # seconds it waits otherwise: records come out at most this much later


class IndexWriter(threading.Thread):
    """Indexes stored files in batched transactions, then emits their records in order."""

    def __init__(self, index_path: Path, emit: Callable[[dict], None], on_fatal: Callable[[str], None], batch: int = 200,
                 sync_files: bool = False, on_batch: Callable[[int], None] | None = None):
        super().__init__(name="dserve-indexer", daemon=True)
        self.on_batch = on_batch
        self.sync_files = sync_files
        self.index_path = index_path
        self.emit = emit
        self.on_fatal = on_fatal
        self.batch = batch
        self.q: queue.Queue = queue.Queue()
        self.ready = threading.Event()
        self.error: str | None = None
        self.indexed = 0

    def put(self, path: Path, header: Any = None, temporary: str | None = None) -> None:
        """Queue a stored file, with its parsed header when the store already has it.

        With sync = "batch", the file is still at `temporary`: it is renamed to `path`
        after the batch is synced (temporary file, fsync, rename), then indexed."""
        self.q.put((path, header, temporary))

    def stop(self, timeout: float | None = None) -> None:
        self.q.put(_STOP)
        self.join(timeout)

    def run(self) -> None:
        from ..index.db import open_index
        from ..index.ingest import Indexer

        try:
            conn = open_index(self.index_path)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            self.error = f"{self.index_path}: cannot open the index ({exc})"
            self.ready.set()
            return
        self.ready.set()
        stopping = False
        try:
            with Indexer(conn) as indexer:
                while not stopping:
                    first = self.q.get()
                    if first is _STOP:
                        break
                    batch = [first]
                    # Let more files arrive before taking them: one transaction (and with
                    # sync = "batch", one sync) for all of them. Sleeping, not waiting on the
                    # queue, so that a store does not wake this thread, which would then take
                    # the GIL from the association threads, once per file.
                    time.sleep(LINGER if self.sync_files else SHORT_LINGER)
                    while len(batch) < self.batch:
                        try:
                            nxt = self.q.get_nowait()
                        except queue.Empty:
                            break
                        if nxt is _STOP:
                            stopping = True
                            break
                        batch.append(nxt)
                    if self.sync_files:
                        batch = _sync_and_rename(batch)
                    done = []
                    for path, header, _tmp in batch:
                        try:
                            if header is None:
                                done.append(indexer.add(str(path)))
                            else:
                                st = os.stat(path)
                                done.append(indexer.add_header(str(path), st.st_size, st.st_mtime_ns, header))
                        except FileNotFoundError:
                            log.error("%s: replaced or removed before it was indexed", path)
                        except DtoolsError as exc:
                            log.error("%s: stored but not indexed (%s); run dindex on it", path, exc)
                    indexer.flush()
                    self.indexed += len(done)
                    for rec in done:
                        try:
                            self.emit(rec)
                        except (BrokenPipeError, OSError) as exc:
                            if isinstance(exc, BrokenPipeError) or exc.errno == errno.EPIPE:
                                if self.on_batch is not None:
                                    self.on_batch(len(done))  # indexed, though not all printed
                                self.on_fatal("standard output was closed; stopping (stored files are indexed)")
                                return
                            raise
                    if self.on_batch is not None:
                        self.on_batch(len(done))
        except Exception as exc:  # noqa: BLE001
            self.error = f"indexing failed ({type(exc).__name__}: {exc})"
            self.on_fatal(self.error)
        finally:
            conn.close()


def _sync_and_rename(batch: list[tuple[Path, Any, str | None]]) -> list[tuple[Path, Any, str | None]]:
    """sync = "batch": make the batch's temporary files durable, rename them into place, make
    the renames durable. The files that could not be moved are left out (and removed)."""
    _sync_batch([Path(tmp or p) for p, _h, tmp in batch])
    placed = []
    for path, header, tmp in batch:
        if tmp:
            try:
                os.rename(tmp, path)
            except OSError as exc:
                log.error("%s: stored but not moved into place (%s)", path, exc.strerror or exc)
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                continue
        placed.append((path, header, None))
    _sync_batch([Path(p) for p, _h, _t in placed], dirs_only=True)
    return placed


def _sync_batch(paths: list[Path], dirs_only: bool = False) -> None:
    """Make a batch of stored files durable (sync = "batch"): syncfs, else fsync each file and directory."""
    if paths and syncfs(Path(paths[0]).parent):
        return
    for p in [] if dirs_only else paths:
        try:
            fsync_path(p)
        except OSError as exc:
            log.error("%s: cannot fsync (%s)", p, exc.strerror or exc)
    for d in {Path(p).parent for p in paths}:
        fsync_dir(d)


class IndexProcess:
    """Runs the indexer in a child process; the same interface as the IndexWriter thread."""

    def __init__(self, index_path: Path, emit: Callable[[dict], None], on_fatal: Callable[[str], None],
                 batch: int = 200, sync_files: bool = False, records_fd: int | None = None):
        """With `records_fd`, the child writes the records to that file descriptor itself (dserve
        gives it its stdout), so they still come out if dserve is killed; otherwise they come
        back over the pipe and go to `emit`."""
        self.records_fd = records_fd
        self.index_path = index_path
        self.emit = emit
        self.on_fatal = on_fatal
        self.batch = batch
        self.sync_files = sync_files
        self.ready = threading.Event()
        self.error: str | None = None
        self.indexed = 0
        self.proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._stopping = False
        self._out_closed = False

    def start(self) -> None:
        # A copy of the records descriptor: the child's own 0 and 1 are its pipes to us.
        fd = None if self.records_fd is None else os.dup(self.records_fd)
        # -P: "python -m" would otherwise put the working directory first on sys.path, and a
        # dserve started in a directory others can write to would run their dtools package.
        # The path to this dtools goes in PYTHONPATH instead, so the child runs this code.
        argv = [sys.executable, "-P", "-m", "dtools.net.indexproc", str(self.index_path), str(self.batch),
                "batch" if self.sync_files else "always", str(log.getEffectiveLevel()), "-" if fd is None else str(fd)]
        here = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         pass_fds=() if fd is None else (fd,),
                                         env={**os.environ, "DTOOLS_SITE_GROUP": security.group_name() or "",
                                              "PYTHONPATH": path})
        except OSError as exc:
            self.error = f"cannot start the indexer ({exc.strerror or exc})"
            self.ready.set()
            return
        finally:
            if fd is not None:
                os.close(fd)
        self._reader = threading.Thread(target=self._read, name="dserve-indexer", daemon=True)
        self._reader.start()

    def is_alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def put(self, path: Path | str, header: Any = None, temporary: str | None = None) -> None:
        """Queue a stored file for indexing, with its parsed header when the store has it
        (and the temporary name it is still at, see IndexWriter.put)."""
        hdr = None if header is None else (header.attrs, header.transfer_syntax, header.text)
        body = pickle.dumps((str(path), hdr, temporary), protocol=pickle.HIGHEST_PROTOCOL)
        frame = memoryview(_FRAME.pack(len(body)) + body)
        with self._lock:
            try:
                assert self.proc is not None and self.proc.stdin is not None
                fd = self.proc.stdin.fileno()
                while frame:
                    frame = frame[os.write(fd, frame):]
            except (OSError, ValueError, AssertionError):
                log.error("%s: stored but not indexed (the indexer has stopped); run dindex on it", path)

    def stop(self, timeout: float | None = None) -> None:
        """Let the indexer commit what it has and exit; wait for its last records."""
        self._stopping = True
        if self.proc is None:
            return
        with self._lock:
            try:
                self.proc.stdin.close()  # type: ignore[union-attr]
            except OSError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("the indexer did not finish in %s s; stopping it (run dindex on the archive)", timeout)
            self.proc.kill()
            self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout)

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                msg = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if "record" in msg:
                self._emit(msg["record"])
            elif "indexed" in msg:
                self.indexed += int(msg["indexed"])
            elif "log" in msg:
                level, text = msg["log"]
                log.log(int(level), "%s", text)
            elif "ready" in msg:
                self.ready.set()
            elif "error" in msg:
                self.error = str(msg["error"])
                self.ready.set()
            elif "fatal" in msg:
                self.error = str(msg["fatal"])
                self.on_fatal(self.error)
        if not self.ready.is_set():
            self.error = self.error or "the indexer stopped while starting"
            self.ready.set()
        elif not self._stopping and self.error is None:
            self.error = "the indexer stopped unexpectedly; run dindex on the archive for what it missed"
            self.on_fatal(self.error)

    def _emit(self, record: dict) -> None:
        if self._out_closed:
            return
        try:
            self.emit(record)
        except OSError as exc:
            if isinstance(exc, BrokenPipeError) or exc.errno == errno.EPIPE:
                self._out_closed = True
                self.on_fatal("standard output was closed; stopping (stored files are indexed)")
                return
            raise


def _read_exact(stream: Any, n: int) -> bytes | None:
    data = stream.read(n)
    return data if data is not None and len(data) == n else None


def main(argv: list[str] | None = None) -> int:
    """The child: ``python -m dtools.net.indexproc INDEX BATCH always|batch LOGLEVEL RECORDS_FD|-``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    index_path, batch, sync, level, records_fd = (argv if argv is not None else sys.argv[1:])
    security.set_group(os.environ.get("DTOOLS_SITE_GROUP"), "[site] group")  # dserve's file modes
    out = sys.stdout.buffer
    lock = threading.Lock()

    def send(msg: dict) -> None:
        with lock:
            try:
                out.write(orjson.dumps(msg) + b"\n")
                out.flush()
            except (OSError, ValueError):  # dserve is gone; the index is still committed
                pass

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            send({"log": [record.levelno, record.getMessage()]})

    logger = logging.getLogger("dtools")
    logger.handlers[:] = [Forward()]
    logger.setLevel(int(level))
    logger.propagate = False

    from ..dicom.header import Header

    if records_fd == "-":
        def emit(record: dict) -> None:
            with lock:
                out.write(orjson.dumps({"record": record}) + b"\n")
                out.flush()
    else:
        records_out = open(int(records_fd), "wb", closefd=False)

        def emit(record: dict) -> None:
            records.write(record, records_out)

    writer = IndexWriter(Path(index_path), emit, lambda m: send({"fatal": m}), int(batch), sync_files=sync == "batch",
                         on_batch=lambda n: send({"indexed": n}))
    writer.start()
    writer.ready.wait()
    if writer.error:
        send({"error": writer.error})
        return 1
    send({"ready": True})
    inp = sys.stdin.buffer
    while writer.is_alive():
        head = _read_exact(inp, 4)
        if head is None:
            break
        body = _read_exact(inp, _FRAME.unpack(head)[0])
        if body is None:
            break
        path, hdr, temporary = pickle.loads(body)
        writer.put(Path(path), Header(*hdr) if hdr is not None else None, temporary)
    writer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
