"""dmail-recv: fetch parts from the relay, reassemble envelopes into HOME/inbox, take receipts."""

from __future__ import annotations

import time

import click

from .. import cli
from ..dicom.archive import clean_stale_temporaries
from ..errors import InputError, UsageError
from ..mail import message as msg
from ..exchange.ledger import Ledger, ledger_path
from ..mail.common import RunLock, parse_age, retention
from ..mail.receiver import Receiver
from ..mail.relay import open_mailbox, relay_for
from ..mail.sender import require_site


@cli.command("dmail-recv", short_help="Fetch envelopes and receipts from the relay mailbox.")
@click.option("--relay", metavar="URL", default=None,
              help="Relay: imaps://USER@HOST[:PORT]/FOLDER, imap://... or maildir:/PATH "
                   "[env DTOOLS_RELAY_URL; config relay.url; default maildir:HOME/relay].")
@click.option("--idle", is_flag=True,
              help="Keep running after the first pass and fetch mail as it arrives (IMAP IDLE).")
@click.option("--max-time", metavar="AGE", default=None,
              help="With --idle: stop after AGE (e.g. 55m) [default: run until stopped].")
@click.option("--idle-timeout", metavar="AGE", default="5m", show_default=True,
              help="With --idle: renew IDLE (and rescan) at least this often.")
@click.option("--part-timeout", metavar="AGE", default=None,
              help="Report envelopes still incomplete after AGE [config relay.part_timeout; default 1d].")
@click.option("--done-folder", metavar="NAME", default=None,
              help="Move processed messages to this relay folder instead of deleting them.")
@click.option("--insecure-skip-verify", "insecure", is_flag=True,
              help="INSECURE: do not verify the server's TLS certificate (test servers only).")
def cmd(app: cli.App, relay, idle, max_time, idle_timeout, part_timeout, done_folder, insecure):
    """Fetch this site's folder of the relay (BASE/SITE) once and write what arrived.

    Each part is checked against its sender's signature and its SHA-256 and kept in
    HOME/spool until a set is complete; the envelope is then written atomically to
    HOME/inbox/ID.dtenv and an 'envelope' record is printed. Messages leave the relay only
    after that. Every run prints again the envelopes that 'dseal --open' has not opened yet.
    Receipts from peers are verified, printed as 'receipt' records and marked in the ledger.
    """
    config = app.config
    config.ensure_home()
    site = require_site(config)
    part_age = parse_age(part_timeout or str(config.get("relay.part_timeout", "1d")), "--part-timeout")
    max_age = parse_age(max_time, "--max-time") if max_time is not None else None
    idle_age = max(1.0, parse_age(idle_timeout, "--idle-timeout"))
    if (max_time is not None) and not idle:
        raise UsageError("--max-time only applies with --idle")
    if done_folder is not None:
        try:
            for piece in done_folder.split("/"):
                msg.check_site(piece, "--done-folder")
        except InputError as exc:
            raise UsageError(str(exc)) from None
    keep_inbox, keep_outbox = retention(config)
    url, key = relay_for(config, relay)
    with RunLock(config.dir("spool") / ".dmail-recv.lock", app.prog):
        clean_stale_temporaries(config.dir("spool"))
        clean_stale_temporaries(config.dir("inbox"))
        ledger = Ledger(ledger_path(config.home))
        box = open_mailbox(config, url, key, insecure)
        try:
            with app.progress("receiving", None, "bytes") as advance:
                rx = Receiver(config, ledger, site, url, box, emit=app.emit, fail=app.fail,
                              done_folder=done_folder, part_timeout=part_age, keep_opened=keep_inbox,
                              keep_delivered=keep_outbox, rehand_after=idle_age, advance=advance)
                rx.sync()
                if idle:
                    deadline = None if max_age is None else time.monotonic() + max_age
                    while deadline is None or time.monotonic() < deadline:
                        wait = idle_age if deadline is None else min(idle_age, deadline - time.monotonic())
                        if wait <= 0:
                            break
                        box.wait(wait)
                        rx.sync()
        finally:
            box.close()
            ledger.close()
    c = rx.counts
    app.info(f"{c['envelopes']} envelope(s), {c['receipts']} receipt(s), {c['parts']} part(s) fetched")


main = cli.entry(cmd)

if __name__ == "__main__":
    cli.run(cmd)
