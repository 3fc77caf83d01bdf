"""Where the exchange with each peer stands, read from the ledger (dstatus).

Every figure is one grouped query over an indexed column, so a ledger of a hundred
thousand envelopes answers in milliseconds. Nothing here writes.
"""

from __future__ import annotations

import time
from collections import defaultdict

from .ledger import Ledger

FIELDS = ("sealed", "not_deposited", "awaiting_receipt", "delivered", "oldest_awaiting_s",
          "unopened", "receipts_owed", "quarantined", "incomplete_sets", "requests_sent", "requests_answered",
          "requests_pending", "requests_served", "requests_refused", "forwards_waiting")

# Totals are one scan of a narrow index; what still waits (usually few) comes from partial
# indexes, and the latest times from one index lookup per peer.
_TOTAL = "SELECT peer, count(*) FROM sealed WHERE lost_at IS NULL GROUP BY peer"
_WAITING = ("SELECT peer, count(*), sum(deposited_at IS NULL), min(sealed_at) FROM sealed"
            " WHERE receipt_at IS NULL AND lost_at IS NULL GROUP BY peer")
_LAST_RECEIPT = "SELECT max(receipt_at) FROM sealed WHERE peer = ?"
_PENDING = ("SELECT sender, sum(quarantined_at IS NULL AND removed_at IS NULL), sum(quarantined_at IS NOT NULL)"
            " FROM received WHERE opened_at IS NULL AND channel = 'envelope' GROUP BY sender")
_SENDERS = "SELECT DISTINCT sender FROM received"
_LAST_RECEIVED = "SELECT max(received_at) FROM received WHERE sender = ?"
_REQUESTS = ("SELECT peer, count(*), sum(status IN ('answered', 'refused')), sum(status = 'pending' AND expires_at > ?)"
             " FROM requests GROUP BY peer")
_SERVED = "SELECT peer, sum(status = 'answered'), sum(status = 'refused') FROM served GROUP BY peer"
_OTHERS = {
    "receipts_owed": "SELECT sender, count(*) FROM opened WHERE receipt_owed = 1 GROUP BY sender",
    "quarantined_relay": "SELECT sender, count(*) FROM quarantine GROUP BY sender",
    "incomplete_sets": "SELECT sender, count(*) FROM spool_sets GROUP BY sender",
    "forwards_waiting": "SELECT peer, count(*) FROM forwards WHERE status = 'waiting' GROUP BY peer",
}


def peer_status(ledger: Ledger, configured: list[str], now: float | None = None) -> list[dict]:
    """One ``peer`` record per configured peer, and per other name the ledger knows (a peer
    removed from config.toml, or a sender nobody authenticated: ``configured`` false)."""
    now = time.time() if now is None else now
    got: dict[str, dict[str | None, object]] = defaultdict(dict)
    db = ledger.db
    for peer, total in db.execute(_TOTAL):
        got["sealed"][peer] = total
        got["last_receipt"][peer] = db.execute(_LAST_RECEIPT, (peer,)).fetchone()[0]
    for peer, waiting, not_deposited, oldest in db.execute(_WAITING):
        got["not_deposited"][peer], got["awaiting_receipt"][peer] = not_deposited, waiting - not_deposited
        got["oldest"][peer] = oldest
    for peer, total in got["sealed"].items():
        got["delivered"][peer] = int(total) - int(got["not_deposited"].get(peer, 0)) - int(  # type: ignore[arg-type]
            got["awaiting_receipt"].get(peer, 0))  # type: ignore[arg-type]
    for peer, unopened, quarantined in db.execute(_PENDING):
        got["unopened"][peer], got["quarantined_inbox"][peer] = unopened, quarantined
    for (peer,) in db.execute(_SENDERS).fetchall():
        got["last_received"][peer] = db.execute(_LAST_RECEIVED, (peer,)).fetchone()[0]
    for name, sql in _OTHERS.items():
        for peer, value in db.execute(sql):
            got[name][peer] = value
    for peer, sent, answered, pending in db.execute(_REQUESTS, (now,)):
        got["requests_sent"][peer], got["requests_answered"][peer], got["requests_pending"][peer] = sent, answered, pending
    for peer, answered, refused in db.execute(_SERVED):
        got["requests_served"][peer], got["requests_refused"][peer] = answered, refused
    names: list[str | None] = list(configured)
    for values in got.values():
        for peer in values:
            if peer not in names:
                names.append(peer)
    out = []
    for peer in names:
        oldest = got["oldest"].get(peer)
        rec = {
            "kind": "peer",
            "peer": peer,
            "configured": peer in configured,
            "sealed": got["sealed"].get(peer, 0),
            "not_deposited": got["not_deposited"].get(peer, 0),
            "awaiting_receipt": got["awaiting_receipt"].get(peer, 0),
            "delivered": got["delivered"].get(peer, 0),
            "oldest_awaiting_s": None if oldest is None else round(now - float(oldest), 1),  # type: ignore[arg-type]
            "unopened": got["unopened"].get(peer, 0),
            "receipts_owed": got["receipts_owed"].get(peer, 0),
            "quarantined": int(got["quarantined_inbox"].get(peer, 0)) + int(got["quarantined_relay"].get(peer, 0)),  # type: ignore[arg-type]
            "incomplete_sets": got["incomplete_sets"].get(peer, 0),
            "requests_sent": got["requests_sent"].get(peer, 0),
            "requests_answered": got["requests_answered"].get(peer, 0),
            "requests_pending": got["requests_pending"].get(peer, 0),
            "requests_served": got["requests_served"].get(peer, 0),
            "requests_refused": got["requests_refused"].get(peer, 0),
            "forwards_waiting": got["forwards_waiting"].get(peer, 0),
            "last_receipt_at": _iso(got["last_receipt"].get(peer)),
            "last_received_at": _iso(got["last_received"].get(peer)),
        }
        out.append(rec)
    return out


def _iso(t: object) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(t)))  # type: ignore[arg-type]
