"""Fetching parts from the relay, spooling them durably and assembling complete envelopes.

Order of durability: a part is fsynced in spool/ before anything else; an envelope is
assembled into inbox/ (temporary name, fsync, rename) and recorded in the ledger before
its messages are removed from the relay. Memory holds one message at a time.
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
from . import message as msg
from .ledger import Ledger
from .relay import Mailbox, RelayURL

log = logging.getLogger("dtools")
_COPY = 1 << 20


class Receiver:
    def __init__(self, config: Config, ledger: Ledger, site: str, url: RelayURL, box: Mailbox, *,
                 emit: Callable[[dict], None], fail: Callable[[str, str], None],
                 done_folder: str | None = None, part_timeout: float | None = None,
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
        self.advance = advance
        self.spool = config.dir("spool")
        self.inbox = config.dir("inbox")
        self.folder = url.folder(site)
        self.quarantine_folder = url.folder(f"{site}-quarantine")
        self._peers = None
        self.counts = {"envelopes": 0, "receipts": 0, "parts": 0}

    # -- one pass -----------------------------------------------------------------
    def sync(self) -> None:
        self._emit_pending()
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
        for uid, _size, head in self.box.list_messages():
            try:
                h = msg.check_headers(msg.parse_header_fields(head))
            except InputError as exc:
                self._quarantine([uid], f"message {uid} in {self.folder}", str(exc))
                continue
            if h.to != self.site:
                log.warning("message %s in %s is addressed to %s, not %s; left in the mailbox",
                            uid, self.folder, h.to, self.site)
                continue
            (receipts if h.kind == msg.KIND_RECEIPT else groups[h.envelope_id]).append((uid, h))
        for envelope_id, items in groups.items():
            self._envelope(envelope_id, items)
        for uid, h in receipts:
            self._receipt(uid, h)
        self._report_stale()

    def _quarantine(self, uids: list[str], what: str, reason: str) -> None:
        """Set a damaged, forged or foreign message aside, where the administrator can look at it.

        Out of the folder it no longer fails every run, and a sender's --retry can replace it
        (the same Message-ID is no longer present)."""
        self.fail(what, f"{reason}; moved to relay folder {self.quarantine_folder}")
        self.box.move(uids, self.quarantine_folder)

    def _sweep_spool(self) -> None:
        # A run killed between storing an envelope and clearing its parts leaves them here.
        for entry in os.scandir(self.spool):
            if entry.is_dir(follow_symlinks=False) and self.ledger.received(entry.name) is not None:
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
            # Delivered before: these are copies a sender's rerun or --retry added.
            log.info("envelope %s was received already; removing %d duplicate message(s)", envelope_id, len(items))
            self._remove([uid for uid, _ in items])
            return
        setdir = self._set_dir(envelope_id)
        by_total: dict[int, dict[int, tuple[str, msg.PartHeaders]]] = defaultdict(dict)
        for uid, h in items:
            by_total[h.total][h.part] = (uid, h)
        for total, parts in sorted(by_total.items(), key=lambda kv: -len(kv[1])):
            first = next(iter(parts.values()))[1]
            self.ledger.note_set(envelope_id, first.sender, total, first.envelope_sha256 or "")
            for part, (uid, h) in sorted(parts.items()):
                target = setdir / f"{total}.{part}.part"
                if target.exists():
                    continue
                try:
                    raw = self.box.fetch(uid)
                    _, payload = msg.extract_payload(raw, h)
                except InputError as exc:
                    self._quarantine([uid], f"envelope {envelope_id} part {part}/{total}", str(exc))
                    continue
                del raw
                write_atomic(target, payload, 0o600)
                self.counts["parts"] += 1
                self.advance(len(payload))
                del payload
            if all((setdir / f"{total}.{i}.part").exists() for i in range(1, total + 1)):
                uids = [uid for uid, _ in parts.values()]
                if self._assemble(envelope_id, total, first, uids):
                    self._remove([uid for uid, _ in items])
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
            self._quarantine(uids, f"envelope {envelope_id}", str(exc))
            return False
        self.ledger.mark_received(envelope_id, h.sender, str(target), size, digest.hexdigest())
        row = self.ledger.received(envelope_id)
        self._emit_row(row)
        return True

    def _emit_row(self, row) -> None:
        self.emit({
            "kind": "envelope",
            "path": row["path"],
            "envelope_id": row["envelope_id"],
            "from": row["sender"],
            "to": [self.site],
            "bytes": row["bytes"],
            "sha256": row["sha256"],
        })
        self.ledger.mark_emitted(row["envelope_id"])
        self.counts["envelopes"] += 1

    def _emit_pending(self) -> None:
        # Assembled but killed before the record went out: emit it now (at least once).
        for row in self.ledger.not_emitted():
            if Path(row["path"]).exists():
                self._emit_row(row)

    def _report_stale(self) -> None:
        if self.part_timeout is None:
            return
        for row in self.ledger.stale_sets(self.part_timeout):
            setdir = self.spool / row["envelope_id"]
            have = len(list(setdir.glob(f"{row['parts']}.*.part"))) if setdir.exists() else 0
            waited = (time.time() - row["first_seen"]) / 3600
            self.fail(f"envelope {row['envelope_id']} from {row['sender']}",
                      f"incomplete: {have} of {row['parts']} parts after {waited:.1f} h; "
                      "ask the sender to run dmail-send --retry")

    # -- receipts -----------------------------------------------------------------
    def _receipt(self, uid: str, h: msg.PartHeaders) -> None:
        from ..seal.keys import load_peers

        what = f"receipt for {h.envelope_id} from {h.sender}"
        key = None
        try:
            if self._peers is None:
                self._peers = load_peers(self.config)
            key = self._peers.get(h.sender)
            if key is None:
                raise InputError(f"unknown peer {h.sender}; add [peers.{h.sender}] to config.toml")
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
            if key is None:  # fixed by configuring the peer: keep it for the next run
                self.fail(what, f"{exc}; left in the mailbox")
            else:
                self._quarantine([uid], what, str(exc))
            return
        sent = self.ledger.sent(h.envelope_id, h.sender)
        status = "delivered"
        if sent is None:
            status = "unknown-envelope"
        elif body.get("sha256") and body["sha256"] != sent["sha256"]:
            self.fail(what, "the peer received different bytes than we sent; run dmail-send --retry")
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

