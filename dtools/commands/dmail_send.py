"""dmail-send: deposit sealed envelopes (or signed receipts) in the IMAP or Maildir relay."""

from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import click

from .. import cli
from ..errors import ConfigError, InputError, UsageError
from ..exchange.ledger import Ledger, ledger_path
from ..mail import message as msg
from ..mail.common import RunLock, parse_keep, retention
from ..mail.receiver import sweep_delivered
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
              help="Send again every envelope that has had no receipt for AGE (e.g. 6h, 1d) "
                   "[config relay.retry_after; default 6h; 'never' to turn off].")
@click.option("--receipts", is_flag=True,
              help="Send the signed receipts this site owes for the envelopes it opened (records from "
                   "'dseal --open' on stdin are sent first, as they come).")
@click.option("--insecure-skip-verify", "insecure", is_flag=True,
              help="INSECURE: do not verify the server's TLS certificate (test servers only).")
def cmd(app: cli.App, relay, to, max_message_size, retry, receipts, insecure):
    """Deposit envelope records read on stdin in the relay, split into MIME messages.

    Each envelope goes to the folder of each addressee (BASE/PEER). Every run first deposits
    what was sealed here and is not in the relay yet (a deposit that failed before), and
    sends again what has had no receipt for --retry. A rerun after a crash adds no
    duplicate; the ledger in HOME/outbox/ledger.db remembers what was sealed and sent and
    whether a receipt came back. One 'message' record is written per envelope and peer.
    """
    config = app.config
    config.ensure_home()
    site = require_site(config)
    size = _size(max_message_size or str(config.get("relay.max_message_size", "20M")))
    if retry is not None:
        retry_age = parse_keep(retry, "--retry")
    else:
        retry_age = parse_keep(config.get("relay.retry_after", "6h"), "[relay] retry_after")
    if receipts and retry is not None:
        raise UsageError("--receipts and --retry do not go together; run them as two commands")
    known = set(config.section("peers")) | {site}  # a site may seal for itself (a backup through the relay)
    for peer in to:
        try:
            msg.check_site(peer, "--to peer")
        except InputError as exc:
            raise UsageError(str(exc)) from None
        if peer not in known:
            raise UsageError(f"--to {peer}: not a configured peer; add it with 'dseal peers add {peer} \"<its "
                             f"identity line>\"' (see 'dseal peers')")
    relay_for(config, relay)  # a bad address is a usage error before any input is read
    _, keep_outbox = retention(config)
    identity = _identity(config)
    ledger = Ledger(ledger_path(config.home))
    sender = Sender(config, ledger, site, relay_flag=relay, max_message_size=size, insecure=insecure,
                    identity=identity)
    try:
        with RunLock(config.dir("outbox") / ".dmail-send.lock", app.prog):
            if receipts:
                if identity is None:
                    raise ConfigError(f"no site identity in {config.home / 'keys'} to sign receipts with; "
                                      "run 'dseal keygen NAME'")
                _send_receipts(app, sender, identity)
            else:
                _send_envelopes(app, sender, list(to), known, retry_age)
                if keep_outbox is not None:
                    sweep_delivered(ledger, keep_outbox)
    finally:
        sender.close()
        ledger.close()


def _identity(config):
    from ..seal.keys import load_identity

    try:
        return load_identity(config)
    except ConfigError:
        return None  # a passphrase-only site: its envelope parts go unsigned


def _send_envelopes(app: cli.App, sender: Sender, to: list[str], known: set[str], retry_age: float | None) -> None:
    counts = {"sent": 0, "skipped": 0, "bytes": 0}
    done: set[tuple[str, str]] = set()  # one record per envelope and peer, however it came

    def tally(out: dict) -> None:
        key = (out["envelope_id"], out["peer"])
        if key in done and out["status"] == "already-sent":
            return
        done.add(key)
        app.emit(out)
        if out["status"] == "already-sent":
            counts["skipped"] += 1
        else:
            counts["sent"] += 1
            counts["bytes"] += out["bytes"]

    with app.progress("sending", None, "bytes") as advance:
        # What an earlier run sealed or began to deposit and did not finish: first.
        for out in sender.deposit_pending(app.fail, advance):
            tally(out)
        if sys.stdin is not None and not sys.stdin.isatty():
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
                        if peer not in known:
                            raise InputError(f"{peer} is not a configured peer; add [peers.{peer}] "
                                             "(dseal peers add) or give --to")
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


def _send_receipts(app: cli.App, sender: Sender, identity) -> None:
    """Receipts as records arrive (streaming pipes), then every receipt still owed."""
    ledger = sender.ledger
    unopened: OrderedDict[tuple[str, str], int] = OrderedDict()  # envelopes not in the ledger
    n = 0

    def deposit(envelope_id: str, peer: str, count: int) -> None:
        nonlocal n
        try:
            out = sender.send_receipt(identity, envelope_id, peer, count)
        except InputError as exc:
            app.fail(f"receipt for {envelope_id}", str(exc))
            return
        app.emit(out)
        if out["status"] == "sent":
            n += 1

    for rec in app.read_records():
        envelope_id, peer = rec.get("envelope_id"), rec.get("peer")
        if not envelope_id or rec.get("kind") not in (None, "instance"):
            continue  # an instance that came from elsewhere, not from an envelope
        if rec.get("error"):
            continue
        try:
            msg.check_envelope_id(envelope_id)
            row = ledger.opened(envelope_id)
            if row is not None:
                if row["receipt_owed"]:
                    deposit(envelope_id, row["sender"], row["instances"])
                continue
            if not peer:
                got = ledger.received(envelope_id)
                peer = got["sender"] if got else None
            if not peer:
                raise InputError("record names no peer to send the receipt to")
            msg.check_site(peer, "peer")
        except InputError as exc:
            app.fail(f"envelope {str(envelope_id)[:80]}", str(exc))
            continue
        # Opened by something that does not keep the ledger: count what came through.
        unopened[(envelope_id, peer)] = unopened.get((envelope_id, peer), 0) + 1
    for (envelope_id, peer), count in unopened.items():
        deposit(envelope_id, peer, count)
    for row in ledger.receipts_owed():
        deposit(row["envelope_id"], row["sender"], row["instances"])
    app.info(f"{n} receipt(s) sent")


main = cli.entry(cmd)

if __name__ == "__main__":
    cli.run(cmd)
