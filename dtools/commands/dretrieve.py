"""dretrieve: ask peers for their studies through the relay, and optionally take delivery."""

from __future__ import annotations

import time
from collections import defaultdict

import click
import orjson

from .. import cli
from ..errors import EX_FAILED, EX_TEMPFAIL, EX_UNAVAILABLE, InputError, UsageError

_LEVEL_KEY = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID"}


@cli.command("dretrieve", short_help="Retrieve studies from peers through the relay.")
@click.argument("terms", nargs=-1)
@click.option("-k", "--key", "keys", multiple=True, metavar="KEY=VALUE",
              help="StudyInstanceUID=... or SeriesInstanceUID=... (repeatable; a\\b lists several).")
@click.option("--peer", metavar="NAME", default=None,
              help="The peer to ask, with StudyInstanceUID=... terms (records on stdin name their own peer).")
@click.option("--wait", "wait", metavar="AGE", default=None,
              help="Take delivery here and print the instance records once the studies are in the local "
                   "archive, waiting at most AGE (e.g. 10m). Without it, the receive job takes delivery.")
@click.option("--expires", metavar="AGE", default="1d", show_default=True,
              help="How long the peer may still answer the request.")
@click.option("--relay", metavar="URL", default=None,
              help="Relay: imaps://USER@HOST[:PORT]/FOLDER, imap://... or maildir:/PATH "
                   "[env DTOOLS_RELAY_URL; config relay.url; default maildir:HOME/relay].")
@click.option("--insecure-skip-verify", "insecure", is_flag=True,
              help="INSECURE: do not verify the server's TLS certificate (test servers only).")
def cmd(app: cli.App, terms, keys, peer, wait, expires, relay, insecure):
    """Send a sealed retrieve request to the peer that holds each study or series.

    Reads study or series records carrying "peer" (as 'dsearch --peer NAME --level study'
    prints them; an instance record asks for its series), or takes StudyInstanceUID=...
    and SeriesInstanceUID=... with --peer. The peer seals what it holds for this site only
    and sends it through the relay, with receipts, like any study; a study asked for twice
    arrives once. Prints one 'message' record per request (with --wait, the 'instance'
    records of what arrived instead).
    """
    from ..mail.common import parse_age
    from ..remote import transport as t
    from ..remote.asking import Asker

    config = app.config
    wait_s = parse_age(wait, "--wait") if wait is not None else None
    expires_s = parse_age(expires, "--expires")
    configured = set(config.section("peers"))
    wanted: dict[str, dict[str, set[str]]] = defaultdict(lambda: {"studies": set(), "series": set()})
    if terms or keys:
        if not peer:
            raise UsageError("say which peer holds them: --peer NAME (or pipe records from 'dsearch --peer')")
        for term in list(keys) + list(terms):
            name, sep, value = term.partition("=")
            if not sep or name not in ("StudyInstanceUID", "SeriesInstanceUID", "0020,000D", "0020,000E") or not value:
                raise UsageError(f"{term!r}: give StudyInstanceUID=UID or SeriesInstanceUID=UID")
            bucket = "studies" if name in ("StudyInstanceUID", "0020,000D") else "series"
            for uid in value.split("\\"):
                wanted[peer][bucket].add(_uid(uid))
    else:
        for rec in app.read_records():
            what = rec.get("StudyInstanceUID") or rec.get("path") or "record"
            try:
                p, bucket, uid = _from_record(rec, peer)
            except InputError as exc:
                app.fail(str(what)[:80], str(exc))
                continue
            wanted[p][bucket].add(uid)
    for p in wanted:
        if p not in configured:
            raise UsageError(f"--peer {p}: not a configured peer; configured: {', '.join(sorted(configured)) or 'none'}")
    if not wanted:
        app.info("nothing to retrieve")
        return None
    asker = Asker(config, relay_flag=relay, insecure=insecure, fail=app.fail)
    try:
        requests = {}
        for p, items in wanted.items():
            studies, series = sorted(items["studies"]), sorted(items["series"])
            rid = _pending(asker, p, studies, series)
            if rid is not None:
                app.info(f"{p} was asked for these already (request {rid}, not answered yet); not asking again")
                asker.waiting.add(rid)
                status = "pending"
            else:
                rid = asker.ask(p, t.RETRIEVE, {"studies": studies, "series": series}, expires_in=expires_s,
                                subject=orjson.dumps({"studies": studies, "series": series}).decode())
                status = "sent"
            requests[rid] = (p, studies, series)
            if wait_s is None:
                app.emit({"kind": "message", "request_id": rid, "peer": p, "status": status,
                          "studies": len(studies), "series": len(series)})
        if wait_s is None:
            app.info(f"{len(requests)} retrieve request(s) sent; the receive job takes delivery "
                     "(or run with --wait)")
            return None
        return _take_delivery(app, asker, requests, time.monotonic() + wait_s)
    finally:
        asker.close()


def _uid(value: str) -> str:
    from ..dicom.archive import check_uid

    try:
        return check_uid(value.strip(), "UID")
    except InputError as exc:
        raise UsageError(str(exc)) from None


def _from_record(rec: dict, peer_flag: str | None) -> tuple[str, str, str]:
    from ..dicom.archive import check_uid

    peer = rec.get("peer") or peer_flag
    if not isinstance(peer, str) or not peer:
        raise InputError("has no \"peer\"; search the peer with 'dsearch --peer NAME' first, or give --peer")
    kind = rec.get("kind")
    if kind == "study":
        return peer, "studies", check_uid(rec.get("StudyInstanceUID"), "StudyInstanceUID")
    if kind in ("series", "instance"):
        return peer, "series", check_uid(rec.get("SeriesInstanceUID"), "SeriesInstanceUID")
    raise InputError(f"is a {kind or 'untyped'} record; give study or series records")


def _pending(asker, peer: str, studies: list[str], series: list[str]) -> str | None:
    """A retrieve request to ``peer`` still waiting for its answer that covers all of these."""
    for row in asker.ledger.pending_requests(peer, "retrieve"):
        try:
            subject = orjson.loads(row["subject"] or "{}")
        except orjson.JSONDecodeError:
            continue
        if set(studies) <= set(subject.get("studies", [])) and set(series) <= set(subject.get("series", [])):
            return row["request_id"]
    return None


def _take_delivery(app: cli.App, asker, requests: dict, deadline: float) -> int | None:
    from ..index.db import open_index
    from ..index.query import find
    from ..remote import transport as t
    from ..remote.taking import Taker

    asker.wait(deadline)
    code = None
    taker = Taker(asker, app.fail, app.log.info)
    try:
        for rid, (peer, studies, series) in requests.items():
            got = asker.answers.get(rid)
            if got is None:
                row = asker.ledger.request(rid)
                if row is not None and row["status"] == "answered":  # answered to an earlier run
                    got = (t.RETRIEVED, orjson.loads(row["answer"] or "{}"))
                elif row is not None and row["status"] == "refused":
                    got = (t.REFUSAL, orjson.loads(row["answer"] or "{}"))
            if got is None:
                continue
            kind, body = got
            if kind == t.REFUSAL:
                app.err(f"{peer} refused the retrieve request: {body.get('reason', 'no reason given')}")
                code = code or EX_UNAVAILABLE
                continue
            taker.rids.add(rid)
            taker.envelopes |= {e.get("envelope_id") if isinstance(e, dict) else e
                                for e in body.get("envelopes") or []}
            for uid in body.get("missing") or []:
                app.fail(f"{peer}", f"has no study or series {uid}")
        taker.take(deadline)
        silent = [rid for rid in requests if rid not in asker.answers and
                  (asker.ledger.request(rid) is None or asker.ledger.request(rid)["status"] == "pending")]
        outstanding = taker.outstanding()
    finally:
        taker.close()
    # What arrived: the instance records of every study and series asked for, from the index.
    here = 0
    if app.config.index_path.exists():
        conn = open_index(app.config.index_path, readonly=True)
        try:
            for rid, (peer, studies, series) in requests.items():
                for key, uids in (("StudyInstanceUID", studies), ("SeriesInstanceUID", series)):
                    for uid in uids:
                        for rec in find(conn, "instance", {key: uid}):
                            app.emit({**rec, "peer": peer, "request_id": rid})
                            here += 1
        finally:
            conn.close()
    asked = sum(len(st) + len(se) for _p, st, se in requests.values())
    app.info(f"{here} instance(s) of the {asked} stud{'y' if asked == 1 else 'ies'} or series asked for "
             f"are in the local archive")
    for rid in silent:
        app.err(f"{requests[rid][0]} did not answer retrieve request {rid} in time; is 'dserve --relay' running "
                "there? The request stays valid until it expires; run again with a longer --wait")
    if outstanding:
        app.err(f"{len(outstanding)} envelope(s) have not arrived yet; the receive job opens them when they "
                "do (or run dretrieve --wait again)")
    if silent or outstanding:
        return EX_TEMPFAIL
    if code is None and app.failures:
        return EX_FAILED
    return code


main = cli.entry(cmd)

if __name__ == "__main__":
    cli.run(cmd)
