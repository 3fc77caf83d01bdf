"""dmail-send: deposit sealed envelopes (or signed receipts) in the IMAP or Maildir relay."""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import click

from .. import cli
from ..errors import InputError, UsageError
from ..mail import message as msg
from ..mail.common import RunLock, parse_age
from ..mail.ledger import Ledger, ledger_path
from ..mail.relay import relay_for
from ..mail.sender import Sender, envelope_id_of, require_site

MIB = 1024 * 1024


def _size(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    for suffix, m in (("K", 1024), ("M", MIB), ("G", 1024 * MIB)):
        if t.endswith(suffix):
            t, mult = t[:-1], m
            break
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise UsageError(f"--max-message-size {text!r} is not a size; use bytes or K, M, G (e.g. 20M)") from None
    if value < msg.MIN_MESSAGE_SIZE:
        raise UsageError(f"--max-message-size must be at least {msg.MIN_MESSAGE_SIZE // 1024}K")
    return value


@cli.command("dmail-send", short_help="Deposit envelopes or receipts in the relay mailbox.")
@click.option("--relay", metavar="URL", default=None,
              help="Relay: imaps://USER@HOST[:PORT]/FOLDER, imap://... or maildir:/PATH "
                   "[env DTOOLS_RELAY_URL; config relay.url; default maildir:HOME/relay].")
@click.option("--to", "to", metavar="PEER", multiple=True,
              help="Send to this peer instead of the record's 'to' list (repeatable).")
@click.option("--max-message-size", metavar="SIZE", default=None,
              help="Largest message to deposit, e.g. 20M [config relay.max_message_size; default 20M]; "
                   "lowered to the server's APPENDLIMIT.")
@click.option("--retry", metavar="AGE", default=None,
              help="Also send again every envelope that has had no receipt for AGE (e.g. 6h, 1d).")
@click.option("--receipts", is_flag=True,
              help="Read instance records from 'dseal --open' and send one signed receipt per envelope "
                   "back to its sender.")
@click.option("--insecure-skip-verify", "insecure", is_flag=True,
              help="INSECURE: do not verify the server's TLS certificate (test servers only).")
def cmd(app: cli.App, relay, to, max_message_size, retry, receipts, insecure):
    """Deposit envelope records read on stdin in the relay, split into MIME messages.

    Each envelope goes to the folder of each addressee (BASE/PEER). A rerun after a crash
    adds no duplicate; the ledger in HOME/outbox/ledger.db remembers what was sent and
    whether a receipt came back. One 'message' record is written per envelope and peer.
    """
    config = app.config
    config.ensure_home()
    site = require_site(config)
    size = _size(max_message_size or str(config.get("relay.max_message_size", "20M")))
    retry_age = parse_age(retry, "--retry") if retry is not None else None
    if receipts and retry_age is not None:
        raise UsageError("--receipts and --retry do not go together; run them as two commands")
    for peer in to:
        try:
            msg.check_site(peer, "--to peer")
        except InputError as exc:
            raise UsageError(str(exc)) from None
    relay_for(config, relay)  # a bad address is a usage error before any input is read
    ledger = Ledger(ledger_path(config.home))
    sender = Sender(config, ledger, site, relay_flag=relay, max_message_size=size, insecure=insecure)
    try:
        with RunLock(config.dir("outbox") / ".dmail-send.lock", app.prog):
            if receipts:
                _send_receipts(app, sender)
            else:
                _send_envelopes(app, sender, list(to), retry_age)
    finally:
        sender.close()
        ledger.close()


def _send_envelopes(app: cli.App, sender: Sender, to: list[str], retry_age: float | None) -> None:
    counts = {"sent": 0, "skipped": 0, "bytes": 0}

    def tally(out: dict) -> None:
        app.emit(out)
        if out["status"] == "already-sent":
            counts["skipped"] += 1
        else:
            counts["sent"] += 1
            counts["bytes"] += out["bytes"]

    with app.progress("sending", None, "bytes") as advance:
        if retry_age is None or not sys.stdin.isatty():
            for rec in app.read_records():
                if rec.get("kind") not in (None, "envelope"):
                    continue
                what = rec.get("path") or rec.get("envelope_id") or "record"
                try:
                    if not rec.get("path"):
                        raise InputError("record has no path to an envelope file")
                    envelope_id = envelope_id_of(rec)
                    peers = to or rec.get("to") or []
                    if isinstance(peers, str):
                        peers = [peers]
                    if not peers:
                        raise InputError("envelope has no addressee; give --to PEER")
                    for peer in peers:
                        tally(sender.send_envelope(Path(rec["path"]), envelope_id, peer, rec.get("sha256"),
                                                   advance=advance))
                except InputError as exc:
                    app.fail(what, str(exc))
        if retry_age is not None:
            for row in sender.ledger.due_for_retry(retry_age):
                try:
                    tally(sender.send_envelope(Path(row["path"]), row["envelope_id"], row["peer"],
                                               row["sha256"], retry=True, advance=advance))
                except InputError as exc:
                    app.fail(row["path"], f"cannot resend: {exc}")
    app.info(f"{counts['sent']} envelope(s) deposited ({counts['bytes']} bytes), {counts['skipped']} already in the relay")


def _send_receipts(app: cli.App, sender: Sender) -> None:
    from ..seal.keys import load_identity

    identity = load_identity(sender.config)
    pending: OrderedDict[tuple[str, str], int] = OrderedDict()
    for rec in app.read_records():
        envelope_id, peer = rec.get("envelope_id"), rec.get("peer")
        if not envelope_id:
            continue  # an instance that came from elsewhere, not from an envelope
        if rec.get("error"):
            continue
        try:
            msg.check_envelope_id(envelope_id)
            if not peer:
                got = sender.ledger.received(envelope_id)
                peer = got["sender"] if got else None
            if not peer:
                raise InputError("record names no peer to send the receipt to")
            msg.check_site(peer, "peer")
        except InputError as exc:
            app.fail(f"envelope {str(envelope_id)[:80]}", str(exc))
            continue
        pending[(envelope_id, peer)] = pending.get((envelope_id, peer), 0) + 1
    n = 0
    for (envelope_id, peer), count in pending.items():
        try:
            app.emit(sender.send_receipt(identity, envelope_id, peer, count))
            n += 1
        except InputError as exc:
            app.fail(f"receipt for {envelope_id}", str(exc))
    app.info(f"{n} receipt(s) sent")


main = cli.entry(cmd)

if __name__ == "__main__":
    cli.run(cmd)
