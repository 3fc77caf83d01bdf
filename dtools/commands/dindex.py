"""dindex: parse DICOM headers into the site's index.

Headers are parsed in worker processes and written by this process in batched
transactions. Records are printed only after their batch has committed.
"""

from __future__ import annotations

import os
import select
import stat
import sys
import time
from typing import Iterator

import click

from .. import cli, records
from ..dicom.header import read_header
from ..errors import InputError
from ..index.db import db_path, from_db_path, open_index
from ..index.ingest import INDEX_KEYS, Indexer
from ..workers import Chunks, worker_init

CHUNK = 64  # files per task sent to a worker
BATCH = 2000  # files per transaction
BATCH_SECONDS = 2.0  # ... or this long, whichever comes first
IDLE = object()  # stdin has nothing to read right now: commit what we have


# -- worker side ---------------------------------------------------------------------
def _parse_chunk(items: list[tuple[str, int]]) -> list:
    out = []
    for path, size in items:
        try:
            out.append(read_header(path, size, INDEX_KEYS))
        except InputError as exc:
            out.append(exc)
        except Exception as exc:  # a parser bug must not take the whole run down
            out.append(InputError(f"unreadable DICOM file ({type(exc).__name__}: {str(exc)[:120]})"))
    return out


# -- inputs -----------------------------------------------------------------------------
class Walker:
    """Files under the given paths; follows directory links, reports loops once.

    The walk keeps its own stack, so a tree of any depth is one walk, never a
    RecursionError; anything it cannot use is one failed input and the walk goes on.
    """

    def __init__(self, app: cli.App):
        self.app = app
        self.seen_dirs: set[tuple[int, int]] = set()

    def walk(self, top: str) -> Iterator[tuple[str, os.stat_result]]:
        try:
            st = os.stat(top)
        except FileNotFoundError:
            self.app.fail(top, "no such file or directory")
            return
        except OSError as exc:
            self.app.fail(top, f"cannot stat ({exc.strerror})")
            return
        except UnicodeError:  # from a record: a lone surrogate that stands for no byte
            self.app.fail(top, "not a usable path (holds a character no file name can hold); "
                               "give a name that is not UTF-8 as path_b64")
            return
        except ValueError:
            self.app.fail(top, "not a usable path (holds a NUL byte)")
            return
        if stat.S_ISDIR(st.st_mode):
            yield from self._walk_dir(top, st)
        elif stat.S_ISREG(st.st_mode):
            yield top, st
        else:
            self.app.fail(top, "not a regular file")

    def _list(self, path: str, st: os.stat_result) -> Iterator[os.DirEntry] | None:
        key = (st.st_dev, st.st_ino)
        if key in self.seen_dirs:
            self.app.fail(path, "directory loop (already visited through another link); skipped")
            return None
        self.seen_dirs.add(key)
        try:
            with os.scandir(path) as it:
                return iter(sorted(it, key=lambda e: e.name))
        except OSError as exc:
            self.app.fail(path, f"cannot list directory ({exc.strerror})")
            return None

    def _walk_dir(self, path: str, st: os.stat_result) -> Iterator[tuple[str, os.stat_result]]:
        top = self._list(path, st)
        stack = [top] if top is not None else []
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop()
                continue
            name = entry.name
            if name.startswith(".") and name.endswith(".tmp"):
                continue  # an atomic write in progress (archive, inbox)
            try:
                est = entry.stat()  # follows links
            except OSError as exc:
                self.app.fail(entry.path, f"cannot stat ({exc.strerror or 'broken link'})")
                continue
            if stat.S_ISDIR(est.st_mode):
                below = self._list(entry.path, est)
                if below is not None:
                    stack.append(below)
            elif stat.S_ISREG(est.st_mode):
                yield entry.path, est
            # FIFOs, sockets and devices inside a tree are not files to index: never opened


def _stdin_records(app: cli.App, null: bool) -> Iterator[object]:
    """Records from stdin, with IDLE whenever no more input is ready, so that a slow
    producer (``dmail-recv --idle | dseal --open | dindex``) sees its records promptly."""
    if sys.stdin is None:
        return
    if sys.stdin.isatty():
        app.err("reading paths or records from standard input (end with Ctrl-D)")
    try:
        fd = sys.stdin.fileno()
    except (OSError, ValueError, AttributeError):
        yield from app.read_records(null=null)
        return
    sep = b"\0" if null else b"\n"
    buf = b""
    while True:
        try:
            ready, _, _ = select.select([fd], [], [], 0)
        except (OSError, ValueError):
            ready = [fd]
        if not ready:
            yield IDLE
            select.select([fd], [], [])
        block = os.read(fd, 1 << 16)
        if not block:
            break
        buf += block
        *lines, buf = buf.split(sep)
        for line in lines:
            yield from _parse(app, line, null)
    if buf:
        yield from _parse(app, buf, null)


def _parse(app: cli.App, line: bytes, null: bool) -> Iterator[dict]:
    if null:
        if line:
            yield {"path": line.decode("utf-8", "surrogateescape")}
        return
    if not line.strip():
        return
    try:
        yield records.parse_line(line)
    except ValueError as exc:
        app.fail(f"line {line.strip()[:60].decode('utf-8', 'replace')!r}", str(exc))


# -- the run -----------------------------------------------------------------------------
class Run:
    def __init__(self, app: cli.App, indexer: Indexer, jobs: int):
        self.app = app
        self.ix = indexer
        self.jobs = jobs
        self.chunks = Chunks(jobs, worker_init, (os.getpid(),))
        self.pending: list[tuple[str, os.stat_result, dict | None, tuple | None]] = []  # not yet sent to a worker
        self.waiting: set[str] = set()  # paths offered and not yet written
        self.out: list[dict] = []  # records waiting for their batch to commit
        self.batch_started = time.monotonic()
        self.indexed = self.unchanged = 0
        self.advance = lambda n=1, total=None: None

    # a file to index (or to pass through when unchanged)
    def offer(self, path: str, st: os.stat_result, extra: dict | None) -> None:
        if path in self.waiting:
            return  # the same file given twice: it is already on its way
        row = self.ix.existing(path)
        if row is not None and row[0] == st.st_size and row[1] == st.st_mtime_ns:
            self.unchanged += 1
            self.advance()
            if extra is not None:
                rec = self._record_from_index(path, extra)
                if rec is not None:
                    self.out.append(rec)
            return
        self.pending.append((path, st, extra, row))
        self.waiting.add(path)
        if len(self.pending) >= CHUNK:
            self._dispatch()

    def _record_from_index(self, path: str, extra: dict) -> dict | None:
        from ..index.query import Condition, Query, run_query

        q = Query("instance", [Condition("instance", "{a}.path = ?", [db_path(path)])])
        for rec in run_query(self.ix.conn, q):
            merged = dict(extra)
            merged.update(rec)
            return merged
        return None

    def _dispatch(self) -> None:
        items, self.pending = self.pending, []
        if not items:
            return
        self.chunks.submit(_parse_chunk, items, [(p, st.st_size) for p, st, _, _ in items])
        while self.chunks.full:
            self._collect_one()

    def _collect_one(self) -> None:
        items, results = self.chunks.next()
        for (path, st, extra, row), header in zip(items, results):
            self.advance()
            self.waiting.discard(path)
            if isinstance(header, InputError):
                self.app.fail(path, str(header))
                continue
            try:
                rec = self.ix.add_header(path, st.st_size, st.st_mtime_ns, header, extra, existing=row)
            except InputError as exc:
                self.app.fail(path, str(exc))
                continue
            self.indexed += 1
            self.out.append(rec)
        if self.ix.in_batch >= BATCH or time.monotonic() - self.batch_started >= BATCH_SECONDS:
            self.commit()

    def drain(self) -> None:
        self._dispatch()
        while self.chunks:
            self._collect_one()
        self.commit()

    def commit(self) -> None:
        self.ix.flush()
        self.batch_started = time.monotonic()
        out, self.out = self.out, []
        for rec in out:
            self.app.emit(rec)

    def close(self) -> None:
        self.chunks.close()


def _duplicate_reporter(app: cli.App):
    def report(path: str, other: str, sop: str) -> None:
        app.err(f"{path}: same SOPInstanceUID {sop} is also indexed at {other}; both are kept")

    return report


@cli.command("dindex", help="""Index DICOM files into the site's SQLite index.

PATHs are files or directories (searched recursively). With no PATH, paths or NDJSON
records carrying "path" are read from standard input. One instance record is printed per
file indexed; records read from stdin are passed on even when their file was already
indexed. Files whose path, size and mtime are unchanged are skipped without being parsed.""")
@click.argument("paths", nargs=-1, type=click.Path())
@cli.null_option
@click.option("--prune", is_flag=True, help="Remove index entries whose files are gone (under PATHs, or everywhere).")
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=None, metavar="N",
              help="Parser processes [default: number of CPUs].")
def dindex(app: cli.App, paths, null, prune, jobs):
    jobs = jobs or app.config.get("index.jobs", os.cpu_count() or 1, type=int)
    conn = open_index(app.config.index_path)
    ix = Indexer(conn, on_duplicate=_duplicate_reporter(app))
    run = Run(app, ix, jobs)
    walker = Walker(app)
    pruned = 0
    try:
        with app.progress("indexing", None) as advance:
            run.advance = advance
            if paths and app.interactive:
                _count_in_background([os.path.abspath(p) for p in paths], advance)
            if paths:
                for top in paths:
                    for path, st in walker.walk(os.path.abspath(top)):
                        run.offer(path, st, None)
            elif not (prune and sys.stdin is not None and sys.stdin.isatty()):
                for item in _stdin_records(app, null):
                    if item is IDLE:
                        run.drain()
                        continue
                    path = item.get("path") if isinstance(item, dict) else None
                    if not isinstance(path, str) or not path:
                        app.fail(f"record {str(item)[:60]}", "has no \"path\" field")
                        continue
                    extra = None if set(item) == {"path"} else item
                    for fpath, st in walker.walk(os.path.abspath(path)):
                        run.offer(fpath, st, extra if fpath == os.path.abspath(path) else None)
            run.drain()
            if prune:
                pruned = _prune(ix, [os.path.abspath(p) for p in paths])
                ix.flush()
    except BaseException:
        ix.rollback()
        raise
    finally:
        run.close()
        conn.close()
    summary = f"indexed {run.indexed}, unchanged {run.unchanged}, failed {app.failures}"
    if prune:
        summary += f", pruned {pruned}"
    app.info(summary)


def _count_in_background(tops: list[str], advance) -> None:
    """Give the progress bar its total: count the files under ``tops`` in a thread, raising
    the total as the count grows, while the indexer walks the same tree (the count reads
    only directory entries, so it runs well ahead of parsing)."""
    import threading

    def count() -> None:
        n, seen, stack, last = 0, set(), list(tops), time.monotonic()
        while stack:
            top = stack.pop()
            try:
                st = os.stat(top)
                if not stat.S_ISDIR(st.st_mode):
                    n += stat.S_ISREG(st.st_mode)
                    continue
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                with os.scandir(top) as it:
                    for e in it:
                        if e.name.startswith(".") and e.name.endswith(".tmp"):
                            continue  # skipped by the walk too
                        if e.is_dir():
                            stack.append(e.path)
                        elif e.is_file():
                            n += 1
            except OSError:
                continue  # the walk reports it
            if time.monotonic() - last > 0.1:
                advance(0, total=n)
                last = time.monotonic()
        advance(0, total=n)

    threading.Thread(target=count, name="dindex-count", daemon=True).start()


def _prune(ix: Indexer, tops: list[str]) -> int:
    gone = []
    for (value,) in ix.conn.execute("SELECT path FROM instance ORDER BY path"):
        path = from_db_path(value)
        if tops and not any(path == t or path.startswith(t.rstrip("/") + "/") for t in tops):
            continue
        if not os.path.isfile(path):
            gone.append(path)
    return ix.remove_paths(gone)


main = cli.entry(dindex)

if __name__ == "__main__":
    cli.run(dindex)
