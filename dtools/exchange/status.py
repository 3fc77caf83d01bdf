"""Where the exchange with each peer stands, read from the ledger (dstatus).

Every figure is one grouped query over an indexed column, so a ledger of a hundred
thousand envelopes answers in milliseconds. Nothing here writes.
"""

from __future__ import annotations

import time
from collections import defaultdict

from .ledger import Ledger

FIELDS = ("sealed", "not_deposited", "awaiting_receipt", "delivered", "oldest_awaiting_s",
          "unopened", "receipts_owed", "quarantined", "incomplete_sets")

_QUERIES = {
    # sender side: envelopes sealed for the peer, by how far they got
    "sealed": "SELECT peer, count(*) FROM sealed WHERE lost_at IS NULL GROUP BY peer",
    "not_deposited": (
        "SELECT s.peer, count(*) FROM sealed s LEFT JOIN sent t ON t.envelope_id = s.envelope_id AND t.peer = s.peer"
        " WHERE s.lost_at IS NULL AND s.removed_at IS NULL AND (t.complete IS NULL OR t.complete = 0)"
        " GROUP BY s.peer"),
    "awaiting_receipt": "SELECT peer, count(*) FROM sent WHERE complete = 1 AND receipt_at IS NULL GROUP BY peer",
    "delivered": "SELECT peer, count(*) FROM sent WHERE receipt_at IS NOT NULL GROUP BY peer",
    # the oldest envelope without a receipt, deposited or not, counted from when it was sealed
    "oldest": (
        "SELECT s.peer, min(s.sealed_at) FROM sealed s LEFT JOIN sent t ON t.envelope_id = s.envelope_id"
        " AND t.peer = s.peer WHERE s.lost_at IS NULL AND t.receipt_at IS NULL GROUP BY s.peer"),
    # receiver side: what the peer sent us
    "unopened": (
        "SELECT r.sender, count(*) FROM received r LEFT JOIN opened o ON o.envelope_id = r.envelope_id"
        " WHERE o.envelope_id IS NULL AND r.quarantined_at IS NULL AND r.removed_at IS NULL GROUP BY r.sender"),
    "receipts_owed": "SELECT sender, count(*) FROM opened WHERE receipt_owed = 1 GROUP BY sender",
    "quarantined_inbox": (
        "SELECT r.sender, count(*) FROM received r LEFT JOIN opened o ON o.envelope_id = r.envelope_id"
        " WHERE o.envelope_id IS NULL AND r.quarantined_at IS NOT NULL GROUP BY r.sender"),
    "quarantined_relay": "SELECT sender, count(*) FROM quarantine GROUP BY sender",
    "incomplete_sets": "SELECT sender, count(*) FROM spool_sets GROUP BY sender",
    "last_receipt": "SELECT peer, max(receipt_at) FROM sent GROUP BY peer",
    "last_received": "SELECT sender, max(received_at) FROM received GROUP BY sender",
}


def peer_status(ledger: Ledger, configured: list[str], now: float | None = None) -> list[dict]:
    """One ``peer`` record per configured peer, and per other name the ledger knows (a peer
    removed from config.toml, or a sender nobody authenticated: ``configured`` false)."""
    now = time.time() if now is None else now
    got: dict[str, dict[str | None, object]] = defaultdict(dict)
    for name, sql in _QUERIES.items():
        for peer, value in ledger.db.execute(sql):
            got[name][peer] = value
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
            "last_receipt_at": _iso(got["last_receipt"].get(peer)),
            "last_received_at": _iso(got["last_received"].get(peer)),
        }
        out.append(rec)
    return out


def _iso(t: object) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(t)))  # type: ignore[arg-type]
