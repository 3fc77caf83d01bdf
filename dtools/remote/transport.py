"""Requests and answers as sealed messages: what each kind holds, and sealing and opening them.

A request (a query, a retrieve request) and its answer (an answer, a list of envelopes
sent, a refusal) are envelopes like studies: sealed for their one addressee, signed by
their sender, with the kind and everything else inside the ciphertext. Their clear-text
mail headers carry only ids. Every request has an id and an expiry.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import orjson

from ..config import Config
from ..dicom.archive import AtomicFile, check_uid
from ..errors import InputError
from ..exchange.ledger import Ledger
from ..index.schema import LEVELS
from ..seal import envelope
from ..seal.keys import Identity, PeerKey

QUERY = "query"
RETRIEVE = "retrieve"
ANSWER = "answer"
RETRIEVED = "retrieved"
REFUSAL = "refusal"
REQUEST_KINDS = (QUERY, RETRIEVE)
ANSWER_KINDS = (ANSWER, RETRIEVED, REFUSAL)
CLOCK_SKEW = 300.0  # seconds a peer's clock may be off before its request counts as expired
MAX_UIDS = 10000


def new_request_id() -> str:
    return os.urandom(16).hex()


def seal_message(config: Config, identity: Identity, peer: PeerKey, kind: str, body: dict,
                 directory: str) -> tuple[str, Path, str]:
    """Seal one message for one peer into HOME/outbox/DIRECTORY/; (envelope id, path, sha256)."""
    data = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    eid = envelope.new_envelope_id()
    out_dir = config.dir("outbox") / directory
    out_dir.mkdir(mode=0o700, exist_ok=True)
    path = out_dir / f"{eid}{envelope.SUFFIX}"
    with AtomicFile(path) as out:
        sealed = envelope.seal(out, eid, [envelope.Entry.message(kind, data)], identity=identity, recipients=[peer])
    return eid, path, sealed.sha256


def open_message(config: Config, identity: Identity, peers: dict[str, PeerKey], path: Path,
                 kinds: tuple[str, ...]) -> tuple[str, str, list[tuple[str, dict]]]:
    """Verify and decrypt a request or answer envelope: (sender, sha256, [(kind, body)]).

    InputError unless it holds only messages of ``kinds``, each a JSON object: an envelope
    that carries files, or messages of another kind, is refused whole."""
    staging = config.dir("spool") / f"message-{os.getpid()}-{os.urandom(4).hex()}"
    staging.mkdir(mode=0o700)
    try:
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise InputError(f"cannot read ({exc.strerror})") from None
        with f:
            opened = envelope.open_envelope(f, os.fstat(f.fileno()).st_size, staging, identity=identity,
                                            peers=peers)
        out = []
        for entry, tmp, _digest in opened.files:
            if not entry.is_message or entry.kind not in kinds:
                raise InputError(f"holds a {entry.kind or 'file'} where only {', '.join(kinds)} belong; refused")
            try:
                body = orjson.loads(tmp.read_bytes())
            except orjson.JSONDecodeError:
                raise InputError(f"its {entry.kind} message is not JSON") from None
            if not isinstance(body, dict):
                raise InputError(f"its {entry.kind} message is not a JSON object")
            out.append((entry.kind, body))
        if not out:
            raise InputError("holds no message")
        return opened.peer, opened.sha256, out
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- what each kind holds ------------------------------------------------------------
def _uids(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_UIDS:
        raise InputError(f"{what} is not a list of UIDs")
    return [check_uid(v, what) for v in value]


def check_request(kind: str, body: dict, now: float | None = None) -> dict:
    """The validated body of a request; InputError (the reason to refuse) otherwise."""
    from ..mail.message import check_request_id

    now = time.time() if now is None else now
    check_request_id(body.get("request_id"))
    expires = body.get("expires")
    if not isinstance(expires, (int, float)) or isinstance(expires, bool):
        raise InputError("request has no expiry")
    if expires + CLOCK_SKEW < now:
        raise InputError(f"request expired {now - expires:.0f} s ago")
    if kind == QUERY:
        level = body.get("level")
        if level not in LEVELS:
            raise InputError(f"query level {str(level)[:20]!r} is not one of {', '.join(LEVELS)}")
        keys = body.get("keys") or {}
        if not isinstance(keys, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in keys.items()):
            raise InputError("query keys are not text")
        text = body.get("text")
        if text is not None and not isinstance(text, str):
            raise InputError("query free text is not text")
        limit = body.get("limit")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
            raise InputError("query limit is not a number")
    elif kind == RETRIEVE:
        studies, series = _uids(body.get("studies"), "StudyInstanceUID"), _uids(body.get("series"), "SeriesInstanceUID")
        if not studies and not series:
            raise InputError("retrieve request names no study or series")
    else:
        raise InputError(f"{kind} is not a request")
    return body


def remember_opened(ledger: Ledger, envelope_id: str, peer: str, sha256: str) -> None:
    """A request or answer processed: never handed on again, and owes no receipt."""
    ledger.mark_opened(envelope_id, peer, sha256, 0, False)
