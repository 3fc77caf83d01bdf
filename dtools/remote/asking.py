"""Asking a peer through the relay: send a sealed request, then wait for its answer.

The answer comes to this site's folder for answers (BASE/SITE-answers), which neither the
receive job nor the serving side reads; a command takes only the answers to its own
requests, and clears answers nobody waits for any more (their requests answered or
expired). An answer counts only if it comes from the peer that was asked.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import orjson

from ..config import Config
from ..errors import InputError
from ..exchange.ledger import Ledger, ledger_path
from ..mail import message as msg
from ..mail.receiver import Receiver
from ..mail.sender import Sender, require_site
from ..seal.keys import load_identity, load_peers
from . import transport as t


class Asker:
    def __init__(self, config: Config, *, relay_flag: str | None = None, insecure: bool = False,
                 fail: Callable[[str, str], None] = lambda what, why: None):
        self.config = config
        self.site = require_site(config)
        self.identity = load_identity(config)
        self.peers = load_peers(config)
        self.fail = fail
        self.relay_flag = relay_flag
        self.insecure = insecure
        self.ledger = Ledger(ledger_path(config.home))
        self.sender = Sender(config, self.ledger, self.site, relay_flag=relay_flag, insecure=insecure,
                             identity=self.identity)
        self._box = None
        self._rx: Receiver | None = None
        self.waiting: set[str] = set()
        self.answers: dict[str, tuple[str, dict]] = {}  # request id -> (kind, body)

    def close(self) -> None:
        self.sender.close()  # closes the answers' connection too
        self.ledger.close()

    # -- asking ----------------------------------------------------------------------
    def ask(self, peer: str, kind: str, body: dict, expires_in: float, subject: str | None = None) -> str:
        """Seal a request for ``peer`` and deposit it in its requests folder; returns its id."""
        rid = t.new_request_id()
        expires = time.time() + expires_in
        eid, path, sha = t.seal_message(self.config, self.identity, self.peers[peer], kind,
                                        dict(body, request_id=rid, expires=expires, created=time.time()), "requests")
        self.ledger.note_request(rid, peer, kind, eid, expires, subject)
        try:
            self.sender.send_envelope(path, eid, peer, sha, kind=msg.KIND_REQUEST, request_id=rid)
        except BaseException:
            self.ledger.answer_request(rid, "failed", None)
            raise
        finally:
            try:
                path.unlink()
            except OSError:
                pass
        self.waiting.add(rid)
        return rid

    # -- waiting ---------------------------------------------------------------------
    def _want(self, envelope_id: str, request_id: str | None) -> bool:
        if request_id is None:
            return True  # not an answer: set aside
        if request_id in self.waiting:
            return True
        row = self.ledger.request(request_id)
        # an answer nobody waits for any more (or for a request this site never sent): clear it
        return row is None or row["status"] != "pending" or row["expires_at"] <= time.time()

    def _receiver(self) -> Receiver:
        if self._rx is None:
            # the connection the request went out on, when the peer shares our account
            url, self._box = self.sender.mailbox(None)
            self._rx = Receiver(self.config, self.ledger, self.site, url, self._box, emit=self._answer,
                                fail=self.fail, kind=msg.KIND_ANSWER, want=self._want)
        return self._rx

    def _answer(self, rec: dict) -> None:
        path, eid, rid = Path(rec["path"]), rec["envelope_id"], rec.get("request_id")
        try:
            peer, sha, messages = t.open_message(self.config, self.identity, self.peers, path, t.ANSWER_KINDS)
        except InputError as exc:
            self.fail(f"answer {eid}", f"{exc}; set aside")
            self.ledger.quarantine_received(eid, str(path), str(exc))
            return
        row = self.ledger.request(rid) if rid else None
        for kind, body in messages:
            if row is None or row["peer"] != peer or body.get("request_id") != rid:
                self.fail(f"answer {eid} from {peer}", "answers no request this site sent to that peer; dropped")
                continue
            status = "refused" if kind == t.REFUSAL else "answered"
            first = row["status"] == "pending"
            if first:
                self.ledger.answer_request(rid, status, orjson.dumps(_summary(kind, body)).decode())
            # The first answer counts. A peer that crashed after answering, before it took the
            # request off the relay, refuses the same request as replayed when it sees it
            # again: that later refusal must not undo the answer.
            if rid in self.waiting and rid not in self.answers and (first or kind != t.REFUSAL):
                self.answers[rid] = (kind, body)
        t.remember_opened(self.ledger, eid, peer, sha)
        try:
            path.unlink()
        except OSError:
            pass

    def wait(self, deadline: float, until: Callable[[], bool] | None = None) -> None:
        """Take answers until every request waited for has one (or ``until()``), or the deadline."""
        rx = self._receiver()
        done = until or (lambda: self.waiting <= set(self.answers))
        started = time.monotonic()
        while True:
            rx.sync()
            if done():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            assert self._box is not None
            # A person waits for this answer: look every tenth of a second for the first
            # minute, rather than pay the server's delay in announcing it to IDLE.
            waited = time.monotonic() - started
            self._box.wait(min(left, 30.0), poll=0.1 if waited < 60 else None)


def _summary(kind: str, body: dict) -> dict:
    """What the ledger keeps of an answer: never the records themselves (patient data)."""
    if kind == t.ANSWER:
        return {"kind": kind, "records": len(body.get("records") or [])}
    if kind == t.RETRIEVED:
        return {"kind": kind, "envelopes": [e.get("envelope_id") for e in body.get("envelopes") or []
                                            if isinstance(e, dict)], "instances": body.get("instances")}
    return {"kind": kind, "reason": str(body.get("reason", ""))[:200]}
