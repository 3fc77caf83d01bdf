"""dstatus: where the exchange with each peer stands: sealed, sent, delivered, owed, set aside."""

from __future__ import annotations

import sys

import click

from .. import cli
from ..errors import EX_FAILED, RemoteError, UsageError

TABLE_COLUMNS = [
    ("peer", "peer"), ("sealed", "sealed"), ("not_deposited", "not sent"), ("awaiting_receipt", "awaiting"),
    ("delivered", "delivered"), ("oldest_awaiting_s", "oldest wait"), ("unopened", "unopened"),
    ("receipts_owed", "receipts owed"), ("quarantined", "quarantined"), ("incomplete_sets", "incomplete"),
    ("requests_pending", "asked, pending"), ("requests_served", "served"), ("requests_refused", "refused"),
    ("forwards_waiting", "forwards"),
]


@cli.command("dstatus", short_help="Show what was sealed, sent, delivered, owed and set aside, per peer.")
@click.option("--peer", "peers", metavar="NAME", multiple=True, help="Only this peer (repeatable).")
@click.option("--table", is_flag=True, help="Print a table for people instead of records.")
@click.option("--overdue", metavar="AGE", default=None,
              help="Exit 1, naming the peer, when an envelope has waited longer than AGE for its receipt "
                   "(e.g. 6h): a monitoring check.")
@click.option("--check-relay", is_flag=True,
              help="Also log in to the relay and report its folder sizes and what the server advertises "
                   "(APPENDLIMIT, QUOTA); exit 69 when it cannot be reached.")
@click.option("--relay", metavar="URL", default=None,
              help="With --check-relay: this relay instead of relay.url [env DTOOLS_RELAY_URL].")
@click.option("--insecure-skip-verify", "insecure", is_flag=True,
              help="INSECURE: with --check-relay, do not verify the server's TLS certificate (test servers only).")
def cmd(app: cli.App, peers, table, overdue, check_relay, relay, insecure):
    """Read the site's exchange ledger and print one 'peer' record per peer.

    Sender side: envelopes sealed for the peer, not deposited in the relay yet, awaiting a
    receipt, delivered, and the age in seconds of the oldest one without a receipt. Receiver
    side: envelopes received and not opened, receipts owed, messages set aside (quarantined)
    and incomplete part sets. dstatus never changes anything.
    """
    from ..exchange.ledger import Ledger, ledger_path
    from ..exchange.status import peer_status
    from ..mail.common import parse_age

    config = app.config
    limit = parse_age(overdue, "--overdue") if overdue is not None else None
    if (relay or insecure) and not check_relay:
        raise UsageError("--relay and --insecure-skip-verify only apply with --check-relay")
    configured = sorted(config.section("peers"))
    for name in peers:
        if name not in configured:
            raise UsageError(f"--peer {name}: not a configured peer; configured: {', '.join(configured) or 'none'}")
    path = ledger_path(config.home)
    if path.exists():
        ledger = Ledger(path, readonly=True)
        try:
            rows = peer_status(ledger, configured)
        finally:
            ledger.close()
    else:  # nothing exchanged yet: every figure is zero
        from ..exchange.status import FIELDS
        rows = [dict({"kind": "peer", "peer": p, "configured": True}, **{f: (None if f == "oldest_awaiting_s" else 0)
                                                                          for f in FIELDS},
                     last_receipt_at=None, last_received_at=None) for p in configured]
    if peers:
        rows = [r for r in rows if r["peer"] in peers]
    if table:
        _table(rows, config.site_name or config.home.name)
    else:
        for rec in rows:
            app.emit(rec)
    code = None
    if check_relay:
        code = _check_relay(app, relay, insecure, table)
    if limit is not None:
        late = [r for r in rows if r["oldest_awaiting_s"] is not None and r["oldest_awaiting_s"] > limit]
        for r in late:
            waiting = r["awaiting_receipt"] + r["not_deposited"]
            app.err(f"{r['peer']}: {waiting} envelope(s) without a receipt, the oldest for "
                    f"{_age(r['oldest_awaiting_s'])} (more than {overdue}); see 'dstatus --peer {r['peer']} --table'")
        if late:
            return EX_FAILED
    if not rows:
        app.info(f"no peers configured in {config.path}")
    return code


def _check_relay(app: cli.App, flag: str | None, insecure: bool, table: bool) -> int | None:
    from ..mail.relay import open_mailbox, relay_for
    from ..mail.sender import require_site

    config = app.config
    site = require_site(config)
    relays: dict = {}
    for peer in [None, *sorted(config.section("peers"))]:
        url, key = relay_for(config, flag, peer)
        entry = relays.setdefault(url, (key, []))
        if peer is not None:
            entry[1].append(peer)
    for url, (key, peer_names) in relays.items():
        try:
            box = open_mailbox(config, url, key, insecure)
        except RemoteError as exc:
            raise RemoteError(f"relay {url.display}: {exc}") from None
        try:
            folders = {}
            for folder in [url.folder(site), url.folder(f"{site}-quarantine"), *(url.folder(p) for p in peer_names)]:
                st = box.folder_status(folder)
                folders[folder] = None if st is None else {"messages": st[0], "bytes": st[1]}
            rec = {"kind": "relay", "relay": url.display, **box.server_info(), "folders": folders}
        finally:
            box.close()
        if table:
            sys.stdout.write(f"relay {rec['relay']}: append limit {rec['append_limit'] or 'none advertised'}")
            if rec["quota"]:
                sys.stdout.write("; quota " + ", ".join(f"{q['resource']} {q['usage']}/{q['limit']}" for q in rec["quota"]))
            sys.stdout.write("\n")
            for folder, st in folders.items():
                sys.stdout.write(f"  {folder}: " + ("absent" if st is None else
                                                    f"{st['messages']} message(s), {st['bytes']} bytes") + "\n")
            sys.stdout.flush()
        else:
            app.emit(rec)
    return None


def _age(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _table(rows: list[dict], site: str) -> None:
    """One row per peer when that fits the terminal; otherwise one row per state and a column
    per peer (as many tables as it takes), so an 80-column terminal shows every figure."""
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    title = f"{site}: exchange with its peers"
    names = []
    for r in rows:
        name = r["peer"] if r["peer"] is not None else "(unknown sender)"
        names.append(name + ("" if r["configured"] else " (not configured)"))
    cells = [[(_age(r[k]) if k == "oldest_awaiting_s" else str(r[k])) for k, _ in TABLE_COLUMNS[1:]] for r in rows]
    wide = Table(title=title)
    for key, head in TABLE_COLUMNS:
        wide.add_column(head, justify="left" if key == "peer" else "right", no_wrap=True)
    for name, row in zip(names, cells):
        wide.add_row(name, *row)
    if Measurement.get(console, console.options.update_width(10_000), wide).maximum <= console.width or not rows:
        console.print(wide)
        return
    label = max(len(head) for _, head in TABLE_COLUMNS[1:])
    column = max(max(len(n) for n in names), max(len(c) for row in cells for c in row))
    per_table = max(1, (console.width - label - 4) // (column + 3))
    console.print(title, style="italic", justify="left")
    for start in range(0, len(rows), per_table):
        tall = Table()
        tall.add_column("", no_wrap=True)
        for name in names[start:start + per_table]:
            tall.add_column(name, justify="right", no_wrap=True)
        for i, (_key, head) in enumerate(TABLE_COLUMNS[1:]):
            tall.add_row(head, *(row[i] for row in cells[start:start + per_table]))
        console.print(tall)


main = cli.entry(cmd)

if __name__ == "__main__":
    cli.run(cmd)
