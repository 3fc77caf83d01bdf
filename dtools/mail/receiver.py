"""Fetching parts from the relay, spooling them durably and assembling complete envelopes.

Order of durability: a part is fsynced in spool/ before anything else; an envelope is
assembled into inbox/ (temporary name, fsync, rename) and recorded in the ledger before
its messages are removed from the relay. Memory holds one message at a time.

Every part is authenticated alone, by its sender's signature over its headers, before it
is fetched: a part a stranger injected is set aside by itself, and the genuine set still
completes. An envelope is handed on (printed) by every run until ``dseal --open`` records
it as opened, so a pipeline killed midway loses nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

import orjson

from ..config import Config
from ..dicom.archive import AtomicFile, write_atomic
from ..errors import InputError
from ..exchange.ledger import Ledger
from . import message as msg
from .relay import Mailbox, RelayURL

log = logging.getLogger("dtools")
_COPY = 1 << 20


class Senders:
    """Who may deposit in our folder: configured peers, by their signing keys.

    A peer configured without an identity (passphrase mode) has no key, so its envelope
    parts are taken unsigned and checked only by their digests."""

    def __init__(self, config: Config):
        from ..errors import ConfigError
        from ..seal.keys import load_identity, load_peers

        self.keys = load_peers(config)
        try:
            me = load_identity(config).public()
            self.keys.setdefault(me.name, me)  # what this site sealed for itself
        except ConfigError:
            pass
        self.keyless = {name for name, section in config.section("peers").items()
                        if isinstance(section, dict) and name not in self.keys}

    def check_part(self, h: msg.PartHeaders) -> None:
        """InputError unless this envelope part is signed by the peer it names."""
        key = self.keys.get(h.sender)
        if key is None:
            if h.sender in self.keyless:
                return
            raise InputError(f"sender {h.sender} is not a configured peer")
        if h.signature is None:
            raise InputError(f"part is not signed by {h.sender} (a stranger's, or from a dtools older than 0.2)")
        key.verify(h.signature, h.statement())


class Receiver:
    def __init__(self, config: Config, ledger: Ledger, site: str, url: RelayURL, box: Mailbox, *,
                 emit: Callable[[dict], None], fail: Callable[[str, str], None],
                 done_folder: str | None = None, part_timeout: float | None = None,
                 keep_opened: float | None = None, keep_delivered: float | None = None,
                 rehand_after: float = 300.0, kind: str = msg.KIND_ENVELOPE,
                 want: Callable[[str, str | None], bool] | None = None,
                 on_duplicate: Callable[[str], None] | None = None,
                 advance: Callable[..., None] = lambda n=1, total=None: None):
        self.config = config
        self.ledger = ledger
        self.site = site
        self.url = url
        self.box = box
        self.emit = emit
        self.fail = fail
        self.done_folder = done_folder
        self.part_timeout = part_timeout
        self.keep_opened = keep_opened
        self.keep_delivered = keep_delivered
        self.rehand_after = rehand_after
        self.advance = advance
        self.spool = config.dir("spool")
        # kind: which of the site's folders this receiver reads (envelopes and receipts for the
        # receive job, requests for the serving side, answers for a command that asked);
        # want(envelope_id, request_id): which of its messages to take, the others are left alone.
        self.kind = kind
        self.want = want
        self.on_duplicate = on_duplicate  # a copy of an envelope received before came again
        self.inbox = config.dir("inbox") if kind == msg.KIND_ENVELOPE else config.dir("inbox") / f"{kind}s"
        self.inbox.mkdir(mode=0o700, exist_ok=True)
        self.folder = msg.folder_of(url, site, kind)
        self.quarantine_folder = url.folder(f"{site}-quarantine")
        self.senders = Senders(config)
        self.passes = 0
        self.counts = {"envelopes": 0, "receipts": 0, "parts": 0}

    # -- one pass -----------------------------------------------------------------
    def sync(self) -> None:
        # The first pass of a run hands on every envelope not opened yet; later passes
        # (--idle) only those handed on longer than rehand_after ago.
        self._hand_on(None if self.passes == 0 else time.time() - self.rehand_after)
        self.passes += 1
        self._sweep_spool()
        uidvalidity = self.box.select(self.folder)
        old = self.ledger.uidvalidity(self.url.display, self.folder)
        if old is not None and old != uidvalidity:
            # Our state is keyed by envelope id and part, never by UID, so a renumbered
            # folder only costs a rescan: spooled parts are recognised and not fetched twice.
            log.warning("UIDVALIDITY of %s changed (%s -> %s); rescanning the folder", self.folder, old, uidvalidity)
        self.ledger.set_uidvalidity(self.url.display, self.folder, uidvalidity)
        groups: dict[str, list[tuple[str, msg.PartHeaders]]] = defaultdict(list)
        receipts: list[tuple[str, msg.PartHeaders]] = []
        kinds = (msg.KIND_ENVELOPE, msg.KIND_RECEIPT) if self.kind == msg.KIND_ENVELOPE else (self.kind,)
        for uid, _size, head in self.box.list_messages():
            try:
                h = msg.check_headers(msg.parse_header_fields(head))
                if h.to != self.site:
                    raise InputError(f"addressed to {h.to}, not to this site ({self.site})")
                if h.kind not in kinds:
                    raise InputError(f"a {h.kind} message does not belong in folder {self.folder}")
                if self.want is not None and not self.want(h.envelope_id, h.request_id):
                    continue  # someone else's: another command waits for it
                if h.kind in msg.ENVELOPE_KINDS:
                    self.senders.check_part(h)
            except InputError as exc:
                sender = _claimed_sender(head)
                self._quarantine([uid], f"message {uid} in {self.folder}", str(exc), sender)
                continue
            (receipts if h.kind == msg.KIND_RECEIPT else groups[h.envelope_id]).append((uid, h))
        for envelope_id, items in groups.items():
            self._envelope(envelope_id, items)
        for uid, h in receipts:
            self._receipt(uid, h)
        self._report_stale()
        if self.kind == msg.KIND_ENVELOPE:
            self._retention()

    def _quarantine(self, uids: list[str], what: str, reason: str, sender: str | None = None) -> None:
        """Set a damaged, forged or foreign message aside, where the administrator can look at it.

        Out of the folder it is reported once and never fails a later run, and a sender's
        --retry can replace it (the same Message-ID is no longer present)."""
        self.fail(what, f"{reason}; moved to relay folder {self.quarantine_folder}")
        self.box.move(uids, self.quarantine_folder)
        self.ledger.note_quarantine(sender, what, reason, self.quarantine_folder)

    def _sweep_spool(self) -> None:
        # A run killed between storing an envelope and clearing its parts leaves them here.
        for entry in os.scandir(self.spool):
            if entry.is_dir(follow_symlinks=False) and len(entry.name) >= 8 and all(
                    c in "0123456789abcdef" for c in entry.name) and self.ledger.received(entry.name) is not None:
                shutil.rmtree(entry.path, ignore_errors=True)

    def _remove(self, uids: list[str]) -> None:
        if not uids:
            return
        if self.done_folder:
            self.box.move(uids, self.url.folder(self.done_folder) if "/" not in self.done_folder else self.done_folder)
        else:
            self.box.delete(uids)

    def _set_dir(self, envelope_id: str) -> Path:
        return self.spool / msg.check_envelope_id(envelope_id)

    def _envelope(self, envelope_id: str, items: list[tuple[str, msg.PartHeaders]]) -> None:
        if self.ledger.received(envelope_id) is not None:
            # Delivered before: these are copies a sender's rerun or --retry added. If we
            # opened it and sent a receipt, the sender did not get the receipt: owe it again.
            again = self.ledger.owe_receipt_again(envelope_id)
            log.info("envelope %s was received already; removing %d duplicate message(s)%s", envelope_id,
                     len(items), "; its receipt will be sent again" if again else "")
            self._remove([uid for uid, _ in items])
            if self.on_duplicate is not None:
                self.on_duplicate(envelope_id)
            return
        setdir = self._set_dir(envelope_id)
        by_total: dict[int, dict[int, tuple[str, msg.PartHeaders]]] = defaultdict(dict)
        copies: list[str] = []
        for uid, h in items:
            if h.part in by_total[h.total]:
                copies.append(uid)  # a second signed copy of the same part (a resend)
            else:
                by_total[h.total][h.part] = (uid, h)
        for total, parts in sorted(by_total.items(), key=lambda kv: -len(kv[1])):
            first = next(iter(parts.values()))[1]
            for part, (uid, h) in sorted(parts.items()):
                target = setdir / f"{total}.{part}.part"
                if target.exists():
                    continue
                try:
                    raw = self.box.fetch(uid)
                    _, payload = msg.extract_payload(raw, h)
                except InputError as exc:
                    self._quarantine([uid], f"envelope {envelope_id} part {part}/{total}", str(exc), h.sender)
                    continue
                del raw
                # Noted only once an authenticated part is safely spooled, so junk never
                # makes an incomplete set that fails later runs.
                self.ledger.note_set(envelope_id, first.sender, total, first.envelope_sha256 or "")
                write_atomic(target, payload, 0o600)
                self.counts["parts"] += 1
                self.advance(len(payload))
                del payload
            if all((setdir / f"{total}.{i}.part").exists() for i in range(1, total + 1)):
                uids = [uid for uid, _ in parts.values()]
                if self._assemble(envelope_id, total, first, uids):
                    self._remove([uid for uid, _ in items] + [u for u in copies if u not in uids])
                    shutil.rmtree(setdir, ignore_errors=True)
                return

    def _assemble(self, envelope_id: str, total: int, h: msg.PartHeaders, uids: list[str]) -> bool:
        setdir = self._set_dir(envelope_id)
        target = self.inbox / f"{envelope_id}.dtenv"
        digest = hashlib.sha256()
        size = 0
        try:
            with AtomicFile(target, 0o600) as out:
                for i in range(1, total + 1):
                    with open(setdir / f"{total}.{i}.part", "rb") as f:
                        while block := f.read(_COPY):
                            digest.update(block)
                            out.write(block)
                            size += len(block)
                if digest.hexdigest() != h.envelope_sha256 or (h.envelope_bytes is not None and size != h.envelope_bytes):
                    raise InputError("reassembled envelope does not match its SHA-256 "
                                     "(damaged or tampered in the relay)")
        except InputError as exc:
            shutil.rmtree(setdir, ignore_errors=True)
            self.ledger.drop_set(envelope_id)
            self._quarantine(uids, f"envelope {envelope_id}", str(exc), h.sender)
            return False
        self.ledger.mark_received(envelope_id, h.sender, str(target), size, digest.hexdigest(), self.kind,
                                  h.request_id)
        self._hand(self.ledger.received(envelope_id))
        return True

    def _hand(self, row) -> None:
        rec = {
            "kind": "envelope",
            "path": row["path"],
            "envelope_id": row["envelope_id"],
            "from": row["sender"],
            "to": [self.site],
            "bytes": row["bytes"],
            "sha256": row["sha256"],
        }
        if row["request_id"]:
            rec["request_id"] = row["request_id"]
        self.emit(rec)
        self.ledger.mark_handed(row["envelope_id"])
        self.counts["envelopes"] += 1

    def _hand_on(self, handed_before: float | None) -> None:
        # Received but not opened yet: a pipeline killed after we printed it, a dseal --open
        # that failed, or another command (dmail-recv -q) that took it. Offer it again.
        for row in self.ledger.to_hand_on(handed_before, self.kind):
            if self.want is not None and not self.want(row["envelope_id"], row["request_id"]):
                continue
            if Path(row["path"]).exists():
                self._hand(row)

    def _report_stale(self) -> None:
        if self.part_timeout is None:
            return
        # Reported once; dstatus shows it after that (incomplete_sets).
        for row in self.ledger.stale_sets(self.part_timeout, unreported=True):
            setdir = self.spool / row["envelope_id"]
            have = len(list(setdir.glob(f"{row['parts']}.*.part"))) if setdir.exists() else 0
            waited = (time.time() - row["first_seen"]) / 3600
            self.fail(f"envelope {row['envelope_id']} from {row['sender']}",
                      f"incomplete: {have} of {row['parts']} parts after {waited:.1f} h; "
                      "ask the sender to run dmail-send --retry 0s (dstatus shows it until it completes)")
            self.ledger.mark_reported(row["envelope_id"])

    def _retention(self) -> None:
        """Remove envelope files that are done with: opened inbox envelopes after keep_opened,
        and outbox envelopes every addressee confirmed after keep_delivered."""
        if self.keep_opened is not None:
            for row in self.ledger.opened_files(self.keep_opened):
                _unlink(row["path"])
                self.ledger.mark_received_removed(row["envelope_id"])
        if self.keep_delivered is not None:
            sweep_delivered(self.ledger, self.keep_delivered)

    # -- receipts -----------------------------------------------------------------
    def _receipt(self, uid: str, h: msg.PartHeaders) -> None:
        what = f"receipt for {h.envelope_id} from {h.sender}"
        try:
            key = self.senders.keys.get(h.sender)
            if key is None:
                raise InputError(f"sender {h.sender} is not a configured peer with an identity")
            if h.signature is None:
                raise InputError("receipt is not signed")
            raw = self.box.fetch(uid)
            _, payload = msg.extract_payload(raw, h)
            key.verify(h.signature, payload)
            body = orjson.loads(payload)
            if (not isinstance(body, dict) or body.get("envelope_id") != h.envelope_id
                    or body.get("from") != h.sender or body.get("to") != self.site):
                raise InputError("receipt body does not match its headers")
        except (InputError, orjson.JSONDecodeError) as exc:
            self._quarantine([uid], what, str(exc), h.sender)
            return
        sent = self.ledger.sent(h.envelope_id, h.sender)
        status = "delivered"
        if sent is None:
            status = "unknown-envelope"
        elif body.get("sha256") and body["sha256"] != sent["sha256"]:
            self.fail(what, "the peer received different bytes than we sent; run dmail-send --retry 0s")
            status = "mismatch"
        if status == "delivered":
            self.ledger.mark_receipt(h.envelope_id, h.sender, body.get("instances"))
        self.emit({
            "kind": "receipt",
            "envelope_id": h.envelope_id,
            "peer": h.sender,
            "status": status,
            "instances": body.get("instances"),
            "sha256": body.get("sha256"),
            "received_at": body.get("received_at"),
        })
        self.counts["receipts"] += 1
        self._remove([uid])


def sweep_delivered(ledger: Ledger, age: float) -> int:
    """Remove outbox envelopes whose every addressee sent a receipt at least ``age`` ago."""
    n = 0
    for row in ledger.delivered_files(age):
        _unlink(row["path"])
        ledger.mark_removed(row["envelope_id"])
        n += 1
    return n


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("%s: cannot remove (%s)", path, exc.strerror)


def _claimed_sender(head: bytes) -> str | None:
    """The sender a message claims, for dstatus only (it is not authenticated)."""
    try:
        value = msg.parse_header_fields(head).get(msg.H_FROM.lower())
        return msg.check_site(value) if value else None
    except InputError:
        return None
