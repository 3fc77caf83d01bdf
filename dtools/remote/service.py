"""Serving the relay (dserve --relay): answer granted peers' queries and retrieve requests,
refuse the others, and publish this site's catalog to the peers it shares with.

Requests come from the site's own folder for them (BASE/SITE-requests), which the receive
job never reads. A request is processed until it is answered or refused and then recorded,
so a server killed mid-answer answers it when it starts again; a replayed or expired one is
refused, and so is a peer without the grant. Nothing of the archive reaches a peer that
was not granted it, and studies are sealed only for the peer that asked.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

import orjson

from ..config import Config
from ..errors import DtoolsError, InputError, UsageError
from ..exchange.ledger import Ledger, ledger_path
from ..mail import message as msg
from ..mail.receiver import Receiver
from ..mail.relay import open_mailbox, relay_for
from ..mail.sender import Sender, require_site
from ..seal.keys import load_identity, load_peers
from . import transport as t
from .grants import granted

log = logging.getLogger("dtools")
# Fields of a local record that say where a file lies here: of no use to a peer.
LOCAL_FIELDS = ("path", "path_b64", "size", "mtime")
MAX_ANSWER_RECORDS = 10000


class RelayService:
    def __init__(self, config: Config, *, relay_flag: str | None = None, insecure: bool = False,
                 publish: Callable[["RelayService"], int] | None = None,
                 chores: Callable[[], int] | None = None,
                 fail: Callable[[str, str], None] | None = None):
        self.config = config
        self.site = require_site(config)
        self.identity = load_identity(config)
        self.peers = load_peers(config)
        self.fail = fail or (lambda what, why: log.warning("%s: %s", what, why))
        self.ledger = Ledger(ledger_path(config.home))
        self.sender = Sender(config, self.ledger, self.site, relay_flag=relay_flag, insecure=insecure,
                             identity=self.identity)
        url, key = relay_for(config, relay_flag)
        self.box = open_mailbox(config, url, key, insecure)
        self.rx = Receiver(config, self.ledger, self.site, url, self.box, emit=self._request, fail=self.fail,
                           kind=msg.KIND_REQUEST, on_duplicate=self._duplicate)
        self.publish = publish
        self.chores = chores  # dserve's deferred forwards: one look on every pass
        self.counts = {"answered": 0, "refused": 0, "published": 0, "forwarded": 0}

    def close(self) -> None:
        self.sender.close()
        self.box.close()
        self.ledger.close()

    # -- passes --------------------------------------------------------------------
    def run_once(self, publish: bool = True) -> None:
        """Answer every request waiting, publish what changed in the catalog, deposit what is due."""
        self.rx.sync()
        if publish and self.publish is not None:
            self.counts["published"] += self.publish(self)
        self.sender.deposit_pending(self.fail)
        if self.chores is not None:
            self.counts["forwarded"] += self.chores()

    def run(self, stop: threading.Event, publish_every: float = 60.0, idle: float = 300.0) -> None:
        """Serve until ``stop`` is set: IDLE on the requests folder, a pass whenever mail comes,
        and the catalog published at most every ``publish_every`` seconds."""
        last_publish = -publish_every
        while not stop.is_set():
            due = time.monotonic() - last_publish >= publish_every
            self.run_once(publish=due)
            if due:
                last_publish = time.monotonic()
            # IDLE in short turns, so that a stop is seen within seconds.
            until = time.monotonic() + min(idle, max(1.0, publish_every - (time.monotonic() - last_publish)))
            while not stop.is_set() and time.monotonic() < until:
                if self.box.wait(min(5.0, max(0.1, until - time.monotonic()))):
                    break

    # -- one request -----------------------------------------------------------------
    def _request(self, rec: dict) -> None:
        path, eid, header_rid = Path(rec["path"]), rec["envelope_id"], rec.get("request_id")
        try:
            peer, sha, messages = t.open_message(self.config, self.identity, self.peers, path, t.REQUEST_KINDS)
        except InputError as exc:
            # Not from a peer we know, not for us, damaged: set aside, never answered.
            self.fail(f"request {eid}", f"{exc}; set aside")
            self.ledger.quarantine_received(eid, str(path), str(exc))
            return
        for kind, body in messages:
            rid = body.get("request_id")
            if rid != header_rid:
                self.fail(f"request {eid} from {peer}", "its request id differs from its headers; set aside")
                self.ledger.quarantine_received(eid, str(path), "request id differs from its headers")
                return
            self._serve(peer, kind, body)
        t.remember_opened(self.ledger, eid, peer, sha)
        try:
            path.unlink()
        except OSError:
            pass

    def _serve(self, peer: str, kind: str, body: dict) -> None:
        rid = body["request_id"]
        fresh = self.ledger.note_served(rid, peer, kind)
        row = self.ledger.served(rid)
        if not fresh and (row["peer"] != peer or row["status"] in ("answered", "refused")):
            self._refuse(peer, rid, "replayed request (its id was used before)", record=False)
            return
        try:
            t.check_request(kind, body)
        except InputError as exc:
            self._refuse(peer, rid, str(exc))
            return
        grant = "query" if kind == t.QUERY else "retrieve"
        if not granted(self.config, peer, grant):
            self._refuse(peer, rid, f"{peer} is not granted {grant} here")
            return
        if kind == t.QUERY:
            self._answer_query(peer, rid, body)
        else:
            self._answer_retrieve(peer, rid, body)

    def _send(self, peer: str, rid: str, kind: str, body: dict) -> None:
        eid, path, sha = t.seal_message(self.config, self.identity, self.peers[peer], kind,
                                        dict(body, request_id=rid, answered_at=time.time()), "answers")
        self.sender.send_envelope(path, eid, peer, sha, kind=msg.KIND_ANSWER, request_id=rid)
        try:
            path.unlink()
        except OSError:
            pass

    def _refuse(self, peer: str, rid: str, reason: str, record: bool = True) -> None:
        log.warning("refused request %s from %s: %s", rid, peer, reason)
        if peer in self.peers:
            self._send(peer, rid, t.REFUSAL, {"reason": reason})
        if record:
            self.ledger.finish_served(rid, "refused", reason)
        self.counts["refused"] += 1

    def _answer_query(self, peer: str, rid: str, body: dict) -> None:
        from ..index.db import open_index
        from ..index.query import find

        limit = body.get("limit")
        cap = MAX_ANSWER_RECORDS if limit is None else min(limit, MAX_ANSWER_RECORDS)
        try:
            conn = open_index(self.config.index_path, readonly=True)
        except DtoolsError:  # nothing indexed yet: no matches
            records: list[dict] = []
        else:
            try:
                records = [_public(r) for r in find(conn, body["level"], body.get("keys") or {}, body.get("text"),
                                                    limit=cap + 1)]
            except UsageError as exc:
                conn.close()
                self._refuse(peer, rid, f"query not understood: {exc}")
                return
            conn.close()
        truncated = len(records) > cap
        self._send(peer, rid, t.ANSWER, {"records": records[:cap], "truncated": truncated})
        self.ledger.finish_served(rid, "answered")
        self.counts["answered"] += 1
        log.info("answered query %s from %s: %d record(s)", rid, peer, min(len(records), cap))

    def _answer_retrieve(self, peer: str, rid: str, body: dict) -> None:
        from .retrieving import seal_for_request

        studies, series = body.get("studies") or [], body.get("series") or []
        missing = seal_for_request(self, peer, rid, studies, series)
        # What serves the request: what was sealed for it now, and what had been sealed for
        # the peer before (asked twice, or pushed): the requester waits for all of it.
        sealed = {r["envelope_id"]: r for r in self.ledger.sealed_for_request(rid, peer)}
        for r in self.ledger.envelopes_carrying(peer, studies, series):
            sealed.setdefault(r["envelope_id"], r)
        sealed = list(sealed.values())
        for row in sealed:
            if row["receipt_at"] is not None:
                continue  # delivered long ago
            if self.ledger.sent(row["envelope_id"], peer) is None or not self.ledger.sent(row["envelope_id"], peer)["complete"]:
                self.sender.send_envelope(Path(row["path"]), row["envelope_id"], peer, row["sha256"], request_id=rid)
        answer = {"envelopes": [{"envelope_id": r["envelope_id"], "instances": r["instances"]} for r in sealed],
                  "instances": sum(r["instances"] or 0 for r in sealed), "missing": missing}
        self._send(peer, rid, t.RETRIEVED, answer)
        self.ledger.finish_served(rid, "answered")
        self.counts["answered"] += 1
        log.info("retrieve %s from %s: %d envelope(s), %d instance(s)%s", rid, peer, len(sealed),
                 answer["instances"], f", {len(missing)} not here" if missing else "")

    def _duplicate(self, envelope_id: str) -> None:
        """A request envelope we processed came again: someone replayed it. Refuse it (once more)."""
        row = self.ledger.received(envelope_id)
        opened = self.ledger.opened(envelope_id)
        if row is None or opened is None or row["request_id"] is None:
            return
        served = self.ledger.served(row["request_id"])
        if served is not None and row["sender"] in self.peers:
            self._refuse(row["sender"], row["request_id"], "replayed request (this envelope was answered before)",
                         record=False)


def _public(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in LOCAL_FIELDS}


def answer_body(raw: str | None) -> dict:
    return orjson.loads(raw) if raw else {}
