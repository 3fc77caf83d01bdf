"""NDJSON records on pipes: one JSON object per line, UTF-8, flushed per record.

Input that is not JSON is read as one path per line (or per NUL with ``null=True``).
"""

from __future__ import annotations

import sys
from typing import IO, Callable, Iterable, Iterator

import orjson

KINDS = ("instance", "series", "study", "patient", "envelope", "message", "receipt", "peer", "relay")


def dumps(record: dict) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS)


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
            raise ValueError(f"not a valid JSON record ({exc})") from None
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
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
        if null:
            if not raw:
                continue
            yield {"path": raw.decode("utf-8", "surrogateescape")}
            continue
        if not raw.strip():
            continue
        try:
            yield parse_line(raw)
        except ValueError as exc:
            if on_error is None:
                raise
            on_error(raw.strip()[:80].decode("utf-8", "replace"), str(exc))


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
