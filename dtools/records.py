"""NDJSON records on pipes: one JSON object per line, UTF-8, flushed per record.

Input that is not JSON is read as one path per line (or per NUL with ``null=True``).

A file name that is not valid UTF-8 cannot be a JSON string. Inside dtools it is a str
with surrogate escapes (PEP 383, what ``os.fsdecode`` gives); in a record it is written
as ``path`` for people (each undecodable byte shown as U+FFFD) plus ``path_b64``, the
base64 of the name's bytes, which readers prefer while ``path`` still matches it.
"""

from __future__ import annotations

import os
import sys
from typing import IO, Callable, Iterable, Iterator

import orjson

KINDS = ("instance", "series", "study", "patient", "envelope", "message", "receipt", "peer", "relay")


_OPTS = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS


def dumps(record: dict) -> bytes:
    try:
        return orjson.dumps(record, option=_OPTS)
    except orjson.JSONEncodeError:
        # a str with surrogate escapes (a file name that is not UTF-8); rare, so only
        # then is the record walked
        return orjson.dumps(_encodable(record), option=_OPTS)


def display_text(text: str) -> str:
    """``text`` with surrogate escapes shown as U+FFFD, as JSON and terminals can carry it."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace")


def _encodable(value):
    if isinstance(value, str):
        return display_text(value)
    if isinstance(value, dict):
        out = {k: _encodable(v) for k, v in value.items()}
        path = value.get("path")
        if isinstance(path, str) and out["path"] != path:
            import base64

            try:
                out["path_b64"] = base64.b64encode(os.fsencode(path)).decode("ascii")
            except UnicodeEncodeError:
                pass  # names no file: nothing exact to keep
        return out
    if isinstance(value, (list, tuple)):
        return [_encodable(v) for v in value]
    return value


def _exact_path(obj: dict) -> dict:
    """Replace ``path`` by the name ``path_b64`` stands for, unless someone changed ``path``
    since (then ``path`` is what they meant) or ``path_b64`` is not base64."""
    import base64
    import binascii

    raw = obj.pop("path_b64", None)
    path = obj.get("path")
    if isinstance(raw, str) and isinstance(path, str):
        try:
            exact = os.fsdecode(base64.b64decode(raw, validate=True))
        except (binascii.Error, ValueError):
            return obj
        if display_text(exact) == path:
            obj["path"] = exact
    return obj


def write(record: dict, out: IO[bytes] | None = None) -> None:
    """Write one record and flush, so that ``cmd | next`` streams."""
    if out is None:
        out = sys.stdout.buffer
    out.write(dumps(record))
    out.flush()


def parse_line(line: bytes) -> dict:
    """One input line as a record: JSON objects as they are, anything else as a path.

    Raises ValueError for a line that looks like JSON but is not a valid object.
    """
    text = line.strip()
    if text.startswith(b"{"):
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            if "surrogate" not in str(exc):
                raise ValueError(f"not a valid JSON record ({exc})") from None
            # "\udcff" escapes: Python's json module writes a file name that is not
            # UTF-8 this way (surrogateescape); read it as the bytes it stands for
            import json

            try:
                obj = json.loads(text)
            except ValueError:
                raise ValueError(f"not a valid JSON record ({exc})") from None
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        if "path_b64" in obj:
            _exact_path(obj)
        return obj
    return {"path": line.rstrip(b"\r\n").decode("utf-8", "surrogateescape")}


def read(
    stream: IO[bytes] | None = None,
    null: bool = False,
    on_error: Callable[[str, str], None] | None = None,
) -> Iterator[dict]:
    """Yield records from a byte stream; bad lines go to ``on_error(line, reason)``."""
    if stream is None:
        stream = sys.stdin.buffer
    chunks: Iterable[bytes]
    if null:
        chunks = _split_nul(stream)
    else:
        chunks = stream
    for raw in chunks:
        rec = _one(raw, null, on_error)
        if rec is not None:
            yield rec


def _one(raw: bytes, null: bool, on_error: Callable[[str, str], None] | None) -> dict | None:
    if null:
        return {"path": raw.decode("utf-8", "surrogateescape")} if raw else None
    if not raw.strip():
        return None
    try:
        return parse_line(raw)
    except ValueError as exc:
        if on_error is None:
            raise
        on_error(raw.strip()[:80].decode("utf-8", "replace"), str(exc))
        return None


def read_batches(stream: IO[bytes], null: bool = False, settle: float = 10.0,
                 on_error: Callable[[str, str], None] | None = None) -> Iterator[list[dict]]:
    """Records in batches, for a producer that streams (``dserve | dseal --to``): a batch
    ends when no more input has come for ``settle`` seconds, or at the end of the input."""
    import select

    fd = stream.fileno()
    sep = b"\0" if null else b"\n"
    buf = b""
    batch: list[dict] = []
    while True:
        ready, _, _ = select.select([fd], [], [], settle if batch else None)
        if not ready:
            yield batch
            batch = []
            continue
        block = os.read(fd, 1 << 16)
        if not block:
            break
        buf += block
        *lines, buf = buf.split(sep)
        for line in lines:
            rec = _one(line, null, on_error)
            if rec is not None:
                batch.append(rec)
    if buf:
        rec = _one(buf, null, on_error)
        if rec is not None:
            batch.append(rec)
    if batch:
        yield batch


def _split_nul(stream: IO[bytes]) -> Iterator[bytes]:
    buf = b""
    while True:
        block = stream.read(65536)
        if not block:
            break
        buf += block
        *items, buf = buf.split(b"\0")
        yield from items
    if buf:
        yield buf
