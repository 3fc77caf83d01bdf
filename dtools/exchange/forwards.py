"""The bridge's deferred forwards (ledger v4).

A C-MOVE through a peer's AE title whose study had not arrived within ``[dserve]
bridge_wait`` ended with 0xA702; the study is still on its way. Each pass of dserve's relay
side takes delivery of what that retrieve request brings, and once every envelope is opened
stores the instances to the destination from the local archive, as dstore would. A forward
that cannot reach its destination is tried again on later passes until it expires.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

from ..config import Config
from .ledger import Ledger, ledger_path

log = logging.getLogger("dtools")


def defer(config: Config, peer: str, request_id: str | None, destination: str, studies: list[str],
          series: list[str], expires_in: float) -> None:
    if request_id is None:
        return
    now = time.time()
    ledger = Ledger(ledger_path(config.home))
    try:
        with ledger.transaction() as db:
            db.execute("INSERT INTO forwards (peer, request_id, destination, studies, series, created_at, expires_at)"
                       " VALUES (?,?,?,?,?,?,?)", (peer, request_id, destination, orjson.dumps(studies).decode(),
                                                   orjson.dumps(series).decode(), now, now + expires_in))
    finally:
        ledger.close()


def waiting_counts(db: Any) -> dict[str, int]:
    """Deferred forwards still waiting, per peer (dstatus)."""
    return dict(db.execute("SELECT peer, COUNT(*) FROM forwards WHERE status = 'waiting' GROUP BY peer"))


def run_forwards(config: Config, destinations: dict[str, Any], calling_aet: str, timeout: float = 30.0,
                 peer_aets: dict[str, str] | None = None) -> int:
    """One pass over the waiting forwards; returns how many were completed.

    A peer's study goes to its destination from the peer's bridged AE title (``peer_aets``,
    peer -> AE title), as its C-MOVE would have; otherwise from ``calling_aet``."""
    ledger = Ledger(ledger_path(config.home))
    try:
        rows = list(ledger.db.execute("SELECT * FROM forwards WHERE status = 'waiting' ORDER BY id"))
    finally:
        ledger.close()
    done = 0
    for row in rows:
        try:
            done += _one(config, row, destinations, (peer_aets or {}).get(row["peer"], calling_aet), timeout)
        except Exception as exc:  # noqa: BLE001 - the relay, the destination: try again next pass
            _note(config, row["id"], "waiting", str(exc)[:200])
            log.warning("deferred forward %d to %s: %s; will try again", row["id"], row["destination"], exc)
    return done


def _one(config: Config, row: Any, destinations: dict[str, Any], calling_aet: str, timeout: float) -> int:
    from ..remote import transport as t
    from ..remote.asking import Asker
    from ..remote.taking import Taker

    fid, rid, peer = row["id"], row["request_id"], row["peer"]
    if row["expires_at"] < time.time():
        _note(config, fid, "expired", "the study did not arrive in time")
        log.error("deferred forward %d: %s did not deliver before it expired; nothing was stored to %s", fid, peer,
                  row["destination"])
        return 0
    dest = destinations.get(row["destination"])
    if dest is None:
        _note(config, fid, "failed", f"destination {row['destination']} is no longer configured")
        log.error("deferred forward %d: destination %s is no longer in [dserve.destinations]", fid, row["destination"])
        return 0
    asker = Asker(config, fail=lambda what, why: log.error("%s: %s", what, why))
    taker = None
    try:
        asker.waiting.add(rid)
        asker.wait(time.monotonic())  # one look for the answer
        got = asker.answers.get(rid)
        if got is None:
            req = asker.ledger.request(rid)
            if req is not None and req["status"] == "answered":
                got = (t.RETRIEVED, orjson.loads(req["answer"] or "{}"))
            elif req is not None and req["status"] == "refused":
                got = (t.REFUSAL, orjson.loads(req["answer"] or "{}"))
        if got is None:
            return 0
        kind, body = got
        if kind == t.REFUSAL:
            _note(config, fid, "failed", f"{peer} refused: {body.get('reason', '')}"[:200])
            log.error("deferred forward %d: %s refused the request", fid, peer)
            return 0
        taker = Taker(asker, lambda what, why: log.error("%s: %s", what, why), log.info)
        taker.rids.add(rid)
        taker.envelopes |= {e.get("envelope_id") if isinstance(e, dict) else e
                            for e in body.get("envelopes") or []}
        taker.take(time.monotonic() + 1.0)
        if taker.outstanding():
            return 0
    finally:
        if taker is not None:
            taker.close()
        asker.close()
    stored, failed = _store(config, dest, calling_aet, orjson.loads(row["studies"]), orjson.loads(row["series"]),
                            timeout)
    if failed:
        raise RuntimeError(f"{failed} of {stored + failed} instance(s) not stored")
    _note(config, fid, "done", None)
    log.info("deferred forward %d: %d instance(s) from %s stored to %s", fid, stored, peer, dest)
    return 1


def _store(config: Config, dest: Any, calling_aet: str, studies: list[str], series: list[str],
           timeout: float) -> tuple[int, int]:
    from ..index.db import open_index
    from ..index.query import find
    from ..net.scu import StoreSession, inspect

    conn = open_index(config.index_path, readonly=True)
    try:
        rows = []
        for key, uids in (("StudyInstanceUID", studies), ("SeriesInstanceUID", series)):
            if uids:
                rows += list(find(conn, "instance", {key: "\\".join(uids)}, fields=["path", "SOPInstanceUID"]))
    finally:
        conn.close()
    items = [inspect(r["path"], {"SOPInstanceUID": r.get("SOPInstanceUID")}) for r in rows if r.get("path")]
    if not items:
        return 0, 0
    session = StoreSession(dest, calling_aet, timeout)
    stored = failed = 0
    try:
        session.open(items)
        for item in items:
            if not session.can_send(item):
                session.open(items)
            outcome = session.send(item)
            if outcome.status == "stored":
                stored += 1
            else:
                failed += 1
                log.error("deferred forward: %s to %s: %s", item.sop_instance, dest, outcome.error)
    finally:
        session.close()
    return stored, failed


def _note(config: Config, fid: int, status: str, error: str | None) -> None:
    ledger = Ledger(ledger_path(config.home))
    try:
        with ledger.transaction() as db:
            db.execute("UPDATE forwards SET status=?, attempts=attempts+1, last_error=?, done_at=? WHERE id=?",
                       (status, error, time.time() if status != "waiting" else None, fid))
    finally:
        ledger.close()
