"""Depositing envelopes (and receipts) in the relay: split, encode, APPEND, and remember.

A part is appended only if neither the ledger nor the mailbox already has it, so a rerun
after a crash or a lost connection adds nothing twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Callable

import orjson

from ..config import Config
from ..errors import ConfigError, InputError
from . import message as msg
from ..exchange.ledger import Ledger
from .relay import Mailbox, RelayURL, open_mailbox, relay_for

log = logging.getLogger("dtools")


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class Sender:
    def __init__(self, config: Config, ledger: Ledger, site: str, *, relay_flag: str | None = None,
                 max_message_size: int = 20 * 1024 * 1024, insecure: bool = False, identity=None):
        self.config = config
        self.ledger = ledger
        self.site = site
        self.identity = identity  # signs each envelope part; None for a passphrase-only site
        self.relay_flag = relay_flag
        self.max_message_size = max_message_size
        self.insecure = insecure
        self._boxes: dict[RelayURL, Mailbox] = {}

    def mailbox(self, peer: str | None) -> tuple[RelayURL, Mailbox]:
        """The open mailbox where ``peer``'s folders are (None: this site's own account);
        one connection per relay account, shared."""
        url, key = relay_for(self.config, self.relay_flag, peer)
        box = self._boxes.get(url)
        if box is None:
            box = open_mailbox(self.config, url, key, self.insecure)
            self._boxes[url] = box
            if box.append_limit and box.append_limit < self.max_message_size:
                log.info("%s accepts messages up to %d bytes; parts are sized for that", url.display, box.append_limit)
        return url, box

    def limit(self, box: Mailbox) -> int:
        if box.append_limit:
            return min(self.max_message_size, box.append_limit)
        return self.max_message_size

    def close(self) -> None:
        for box in self._boxes.values():
            box.close()
        self._boxes.clear()

    # -- envelopes ----------------------------------------------------------------
    def send_envelope(self, path: Path, envelope_id: str, peer: str, sha256: str | None = None,
                      retry: bool = False, advance: Callable[[int], None] = lambda n: None,
                      kind: str = msg.KIND_ENVELOPE, request_id: str | None = None) -> dict:
        """Deposit one envelope for one peer; returns the ``message`` record.

        ``kind`` request or answer: a sealed request or answer, deposited in the peer's folder
        for that kind, with ``request_id`` in its headers; the caller owns its retries."""
        msg.check_envelope_id(envelope_id)
        msg.check_site(peer, "peer name")
        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise InputError(f"cannot read envelope file ({exc.strerror})") from None
        row = self.ledger.sent(envelope_id, peer)
        sealed = self.ledger.sealed(envelope_id, peer)
        if row is not None:
            sha256 = row["sha256"]
        elif sealed is not None:
            sha256 = sealed["sha256"]
        elif sha256 is None:
            sha256 = file_sha256(path)
        if sealed is None and kind == msg.KIND_ENVELOPE:
            # Sealed elsewhere (or by an older dtools): from now on the ledger owns it, so a
            # failed deposit is retried by the next run.
            self.ledger.note_sealed(envelope_id, [peer], str(path.absolute()), size, sha256, None)
        if row is not None and row["complete"] and not retry:
            return self._record(row, "already-sent")
        url, box = self.mailbox(peer)
        if row is not None:
            if row["bytes"] != size:
                raise InputError(f"envelope {envelope_id} changed size since it was first sent "
                                 f"({row['bytes']} -> {size} bytes); seal it again under a new id")
            part_size = row["part_size"]
        else:
            part_size = msg.part_payload_size(self.limit(box))
        total = max(1, -(-size // part_size))
        self.ledger.begin_send(envelope_id, peer, str(path.absolute()), size, sha256, part_size, total, url.display,
                               kind)
        folder = msg.folder_of(url, peer, kind)
        mids = {i: msg.message_id(kind, envelope_id, peer, i, total) for i in range(1, total + 1)}
        done = set() if retry else self.ledger.parts_done(envelope_id, peer)
        todo = [i for i in range(1, total + 1) if i not in done]
        present = box.present(folder, envelope_id, [mids[i] for i in todo]) if todo else set()
        appended = 0
        try:
            f = open(path, "rb")
        except OSError as exc:
            raise InputError(f"cannot read envelope file ({exc.strerror})") from None
        with f:
            for i in todo:
                if mids[i] in present:
                    self.ledger.part_done(envelope_id, peer, i)
                    continue
                f.seek((i - 1) * part_size)
                chunk = f.read(part_size)
                data = msg.build(kind, envelope_id, self.site, peer, chunk, part=i, total=total,
                                 envelope_sha256=sha256, envelope_bytes=size, request_id=request_id,
                                 sign=self.identity.sign if self.identity is not None else None)
                del chunk
                box.append(folder, data)
                del data
                self.ledger.part_done(envelope_id, peer, i)
                appended += 1
                advance(min(part_size, size - (i - 1) * part_size))
        self.ledger.complete(envelope_id, peer)
        status = ("resent" if retry else "sent") if appended else "already-sent"
        rec = self._record(self.ledger.sent(envelope_id, peer), status)
        rec["appended"] = appended
        return rec

    def deposit_pending(self, fail: Callable[[str, str], None],
                        advance: Callable[[int], None] = lambda n: None) -> list[dict]:
        """Deposit every envelope sealed here and not (completely) in the relay yet; returns the
        ``message`` records. One whose file is gone is put back from its temporary (a seal
        killed before its rename) or, failing that, reported once and its instances released
        for sealing again."""
        out = []
        for row in self.ledger.undeposited():
            if not Path(row["path"]).exists() and not self._recover(row):
                fail(row["path"], f"envelope {row['envelope_id']} for {row['peer']} was sealed but its file is "
                     "gone; its instances will be sealed again by the next 'dseal --to' for that peer")
                continue
            try:
                out.append(self.send_envelope(Path(row["path"]), row["envelope_id"], row["peer"], row["sha256"],
                                              advance=advance, request_id=row["request_id"]))
            except InputError as exc:
                fail(row["path"], f"cannot deposit: {exc}")
        return out

    def _recover(self, row) -> bool:
        from ..dicom.archive import recover_temporary
        from ..seal.memory import SealLock

        with SealLock(self.config.dir("outbox")):  # a running dseal may be just about to rename it
            if Path(row["path"]).exists() or recover_temporary(Path(row["path"])):
                return True
            self.ledger.mark_lost(row["envelope_id"], row["peer"])
            return False

    def _record(self, row, status: str) -> dict:
        return {
            "kind": "message",
            "envelope_id": row["envelope_id"],
            "peer": row["peer"],
            "path": row["path"],
            "bytes": row["bytes"],
            "sha256": row["sha256"],
            "parts": row["parts"],
            "relay": row["relay"],
            "status": status,
            "sent_at": _iso(row["last_sent"]),
        }

    # -- receipts -----------------------------------------------------------------
    def send_receipt(self, identity, envelope_id: str, peer: str, instances: int) -> dict:
        """A signed receipt for an envelope we opened, back to the peer that sent it."""
        msg.check_envelope_id(envelope_id)
        msg.check_site(peer, "peer name")
        got = self.ledger.received(envelope_id)
        opened = self.ledger.opened(envelope_id)
        body = {
            "kind": "receipt",
            "envelope_id": envelope_id,
            "from": self.site,
            "to": peer,
            "instances": instances,
            "sha256": got["sha256"] if got else (opened["sha256"] if opened else None),
            "bytes": got["bytes"] if got else None,
            "received_at": _iso(got["received_at"] if got else time.time()),
        }
        rec = {"kind": "message", "envelope_id": envelope_id, "peer": peer, "receipt": True,
               "instances": instances}
        if self.ledger.receipt_sent(envelope_id, peer):
            rec["status"] = "already-sent"
            return rec
        url, box = self.mailbox(peer)
        payload = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
        folder = url.folder(peer)
        mid = msg.message_id(msg.KIND_RECEIPT, envelope_id, peer)
        # Deterministic Message-ID: a rerun after a crash finds the copy it deposited.
        if not box.present(folder, envelope_id, [mid]):
            data = msg.build(msg.KIND_RECEIPT, envelope_id, self.site, peer, payload,
                             content_type="application/json", signature=identity.sign(payload))
            box.append(folder, data)
        self.ledger.mark_receipt_sent(envelope_id, peer, instances)
        rec.update(status="sent", relay=url.display)
        return rec


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def require_site(config: Config) -> str:
    site = config.site_name
    if not site:
        # The name given to 'dseal keygen' is the site's name too.
        pub = config.home / "keys" / "identity.pub"
        try:
            fields = pub.read_text(encoding="utf-8").split()
            site = fields[1] if len(fields) >= 2 else None
        except OSError:
            site = None
    if not site:
        raise ConfigError(f"this site has no name; set [site] name = \"...\" in {config.path} "
                          "(or DTOOLS_SITE_NAME)")
    try:
        return msg.check_site(site)
    except InputError as exc:
        raise ConfigError(f"[site] name: {exc}") from None


def envelope_id_of(record: dict) -> str:
    value = record.get("envelope_id")
    if value is None and record.get("path"):
        name = os.path.basename(str(record["path"]))
        if name.endswith(".dtenv"):
            value = name[: -len(".dtenv")]
    if value is None:
        raise InputError("record has no envelope_id and its path is not an .dtenv file")
    return msg.check_envelope_id(value)
