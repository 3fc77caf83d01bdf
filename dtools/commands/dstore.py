"""dstore: push instances to a DICOM peer (C-STORE SCU), one record per instance with its status."""

from __future__ import annotations

import logging
import warnings
import queue
import threading
from typing import Iterator

import click

from .. import cli
from ..errors import RemoteError, UsageError
from ..net.common import DEFAULT_AET, Peer, check_aet, destinations, parse_peer
from ..net.scu import Item, NoContexts, Outcome, StoreSession, inspect, output_record, record_path
from ..net.syntaxes import parse_syntax, split

BATCH = 500  # files inspected and proposed together
GATHER = 0.05  # seconds to wait for more input before sending what has arrived
IDLE_RELEASE = 2.0  # release an idle association after this many seconds without input
_EOF = object()


def resolve_peer(app: cli.App, target: str, aec: str | None) -> Peer:
    if "@" in target or ":" in target:
        peer = parse_peer(target, default_aet=aec or "ANY-SCP")
    else:
        known = destinations(app.config)
        name = check_aet(target, "peer")
        if name not in known:
            raise UsageError(
                f"unknown peer {target!r}: give AET@HOST:PORT or add it under [dserve.destinations] in config.toml"
            )
        peer = known[name]
    if aec:
        peer = Peer(check_aet(aec, "--aec"), peer.host, peer.port)
    return peer


def _reader(app: cli.App, paths: tuple[str, ...], null: bool, q: queue.Queue) -> None:
    try:
        if paths:
            for p in paths:
                q.put({"path": p})
        else:
            for rec in app.read_records(null=null):
                q.put(rec)
    except BaseException as exc:  # noqa: BLE001 - hand the failure to the main thread
        q.put(exc)
    finally:
        q.put(_EOF)


def _batches(q: queue.Queue, on_idle) -> Iterator[list[dict]]:
    """Records in batches: whatever arrives within GATHER seconds, at most BATCH."""
    done = False
    while not done:
        try:
            first = q.get(timeout=IDLE_RELEASE)
        except queue.Empty:
            on_idle()
            first = q.get()
        if first is _EOF:
            return
        if isinstance(first, BaseException):
            raise first
        batch = [first]
        while len(batch) < BATCH:
            try:
                nxt = q.get(timeout=GATHER)
            except queue.Empty:
                break
            if nxt is _EOF:
                done = True
                break
            if isinstance(nxt, BaseException):
                raise nxt
            batch.append(nxt)
        yield batch


@cli.command("dstore", short_help="Send instances to a DICOM peer (C-STORE SCU).")
@click.argument("peer", metavar="PEER")
@click.argument("paths", nargs=-1, type=click.Path(), metavar="[PATH]...")
@click.option("--aet", metavar="AET", default=None,
              help=f"Our (calling) AE title [env DTOOLS_DSTORE_AET; config [dstore] aet; default {DEFAULT_AET}].")
@click.option("--aec", metavar="AET", default=None, help="Called AE title; overrides the one in PEER.")
@click.option("--timeout", type=float, metavar="SECONDS", default=None,
              help="Connect, association and DIMSE timeout [config [dstore] timeout; default 30].")
@click.option("--transfer-syntax", "transfer_syntax", metavar="UID|NAME", default=None,
              help="Send every instance in this transfer syntax, converting where dtools can (to uncompressed "
                   "syntaxes only), e.g. ImplicitVRLittleEndian [config [dstore] transfer_syntax; default: as stored, "
                   "converted only when the peer does not accept that].")
@cli.null_option
def cmd(app: cli.App, peer: str, paths: tuple[str, ...], aet: str | None, aec: str | None,
        timeout: float | None, transfer_syntax: str | None, null: bool):
    """Send DICOM instances to PEER with C-STORE.

    PEER is AET@HOST:PORT, HOST:PORT, or an AE title listed under [dserve.destinations].
    Files come from PATH arguments, or from `instance` records (or one path per line) on
    standard input. Files are sent over as few associations as possible, each proposing
    the presentation contexts the files need; a file is sent as it is stored when the
    peer accepts its transfer syntax, and converted to one the peer accepts otherwise
    (between uncompressed syntaxes, or decompressed; never compressed).
    """
    warnings.filterwarnings("ignore", module="pydicom")  # odd values in files are not our errors
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    target = resolve_peer(app, peer, aec)
    calling = check_aet(app.config.get("dstore.aet", app.config.get("dserve.aet", DEFAULT_AET), flag=aet), "--aet")
    tmo = app.config.get("dstore.timeout", 30.0, flag=timeout, type=float)
    if tmo <= 0:
        raise UsageError("--timeout must be a positive number of seconds")
    want = app.config.get("dstore.transfer_syntax", None, flag=transfer_syntax)
    want = parse_syntax(str(want)) if want else None
    session = StoreSession(target, calling, tmo, want)
    q: queue.Queue = queue.Queue(maxsize=4 * BATCH)
    threading.Thread(target=_reader, args=(app, paths, null, q), daemon=True).start()
    sent = failed = 0
    try:
        with app.progress(f"sending to {target}", None) as advance:
            for batch in _batches(q, session.close):
                items: list[Item] = []
                for rec in batch:
                    path = record_path(rec)
                    if path is None:
                        app.fail(f"record {str(rec)[:60]}", "no path; pipe instance records or paths")
                        failed += 1
                        continue
                    try:
                        items.append(inspect(path, rec))
                    except Exception as exc:  # noqa: BLE001 - InputError, or pydicom on odd files
                        app.fail(path, str(exc))
                        app.emit(output_record(None, {"path": path, **rec}, target,
                                               Outcome("failed", error=str(exc))))
                        failed += 1
                        advance()
                for group in split(items, want):
                    for n, item in enumerate(group):
                        if not session.can_send(item):
                            try:
                                session.open(group[n:])
                            except NoContexts as exc:
                                for it in group[n:]:
                                    app.fail(it.path, str(exc))
                                    app.emit(output_record(it, it.record, target, Outcome("failed", error=str(exc))))
                                    failed += 1
                                    advance()
                                break
                        outcome = session.send(item)
                        if outcome.lost:
                            # The association died under us: one fresh try, then give up (69).
                            session.open(group[n:])
                            outcome = session.send(item)
                        if outcome.status == "stored":
                            sent += 1
                            if outcome.warning:
                                app.log.warning("%s: %s", item.path, outcome.warning)
                        else:
                            failed += 1
                            app.fail(item.path, outcome.error or "failed")
                        app.emit(output_record(item, item.record, target, outcome))
                        advance()
    except RemoteError:
        session.abort()
        if sent or failed:
            app.err(f"{sent} sent, {failed} failed before the peer went away; rerun for the rest")
        raise
    finally:
        session.close()
    app.info(f"{sent} sent, {failed} failed, {session.associations} association(s) to {target}")
    return None


main = cli.entry(cmd)

if __name__ == "__main__":
    cli.run(cmd)
