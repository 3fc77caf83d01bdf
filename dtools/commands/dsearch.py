"""dsearch: query the index with DICOM C-FIND matching and free text, or (--peer) the
copies of peers' catalogs that the index keeps, with the same engine."""

from __future__ import annotations

import sys
import time
from typing import Iterator

import click

from .. import cli
from ..errors import UsageError
from ..index.db import open_index
from ..index.query import count, parse_keys, peer_scope, run_query, normalize_key, KEY_LEVEL, allowed_keys_text
from ..index.schema import LEVELS
from ..index.terms import split_terms

TABLE_FIELDS = {
    "patient": ["PatientID", "PatientName", "PatientBirthDate", "PatientSex", "NumberOfPatientRelatedStudies"],
    "study": ["PatientID", "PatientName", "StudyDate", "ModalitiesInStudy", "StudyDescription",
              "AccessionNumber", "NumberOfStudyRelatedInstances"],
    "series": ["PatientName", "StudyDate", "Modality", "SeriesNumber", "SeriesDescription",
               "NumberOfSeriesRelatedInstances"],
    "instance": ["PatientName", "StudyDate", "Modality", "SeriesNumber", "InstanceNumber", "path"],
}
def quote_words(words: list[str]) -> str:
    return " ".join('"' + w.replace('"', '""') + '"' for w in words)


@cli.command("dsearch", help="""Search the index.

TERMs are Keyword=value (pydicom keywords, or DCMTK's gggg,eeee=value) matched with DICOM
C-FIND rules: exact value, wildcards * and ?, date/time ranges a-b, a- and -b, UID lists
a\\b, and an empty value for universal matching. Other words are free text (SQLite FTS5
syntax) over every text attribute. Prints one record per match at --level.""")
@click.argument("terms", nargs=-1)
@click.option("-k", "--key", "keys", multiple=True, metavar="KEY=VALUE", help="A matching key, as in findscu (repeatable).")
@click.option("-L", "--level", type=click.Choice(LEVELS), default=None,
              help="Answer with patients, studies, series or instances [default: instance; with --peer, study].")
@click.option("--fields", multiple=True, metavar="F1,F2", help="Print only these fields (comma-separated, repeatable).")
@click.option("--limit", type=click.IntRange(0), default=None, metavar="N", help="Print at most N matches.")
@click.option("--offset", type=click.IntRange(0), default=0, metavar="N", help="Skip the first N matches.")
@click.option("--count", "count_only", is_flag=True, help="Print only the number of matches.")
@click.option("--table", is_flag=True, help="Print a table for people instead of records.")
@click.option("--quote", is_flag=True, help="Treat free-text words literally (no FTS5 operators).")
@click.option("--peer", "peer", metavar="NAME", default=None,
              help="Search the copy of peer NAME's catalog kept here ('all': every peer's) instead of this "
                   "site's archive; with --live, ask the peer itself.")
@click.option("--live", is_flag=True, help="With --peer: ask the peer itself through the relay and wait for its answer.")
@click.option("--wait", "wait", metavar="AGE", default="30s", show_default=True,
              help="With --live: how long to wait for the answers (e.g. 30s, 2m).")
def dsearch(app: cli.App, terms, keys, level, fields, limit, offset, count_only, table, quote, peer, live, wait):
    pairs, words = split_terms(terms, keys)
    text = (quote_words(words) if quote else " ".join(words)) or None
    field_list = [f.strip() for spec in fields for f in spec.split(",") if f.strip()]
    if live:
        level = level or "study"
        for f in field_list:
            if normalize_key(f) not in KEY_LEVEL:
                raise UsageError(f"unknown field {f!r}; fields are: {allowed_keys_text()}")
        return _live(app, peer, level, pairs, text, field_list, limit, offset, count_only, table, wait)
    if peer is not None:
        return _search_catalogs(app, peer, level or "study", pairs, text, field_list, limit, offset, count_only, table)
    level = level or "instance"
    for f in field_list:
        if normalize_key(f) not in KEY_LEVEL:
            raise UsageError(f"unknown field {f!r}; fields are: {allowed_keys_text()}")
    q = parse_keys(level, pairs, text)
    conn = open_index(app.config.index_path, readonly=True)
    try:
        if count_only:
            sys.stdout.write(f"{count(conn, q)}\n")
            return None
        wanted = [normalize_key(f) for f in field_list] or None
        results = run_query(conn, q, fields=wanted, limit=limit, offset=offset)
        if table:
            _print_table(app, level, results, wanted or TABLE_FIELDS[level])
            return None
        n = 0
        for rec in results:
            app.emit(rec)
            n += 1
        app.log.info("%d %s record%s", n, level, "" if n == 1 else "s")
    finally:
        conn.close()
    return None


def _live(app, peer, level, pairs, text, field_list, limit, offset, count_only, table, wait):
    from ..mail.common import parse_age
    from ..remote.live import check_live_options, live_search

    if not peer:
        raise UsageError("--live asks a peer: give --peer NAME (or --peer all)")
    check_live_options(count_only, offset)
    configured = sorted(app.config.section("peers"))
    peers = configured if peer == "all" else [peer]
    for p in peers:
        if p not in configured:
            raise UsageError(f"--peer {p}: not a configured peer; configured: {', '.join(configured) or 'none'}")
    wanted = [normalize_key(f) for f in field_list] or None

    def show(records):
        if wanted:
            records = [{"kind": r["kind"], "peer": r["peer"], "answered_at": r["answered_at"],
                        **{k: r.get(k) for k in wanted}} for r in records]
        if table:
            _print_table(app, level, records, ["peer"] + (wanted or TABLE_FIELDS[level]))
            return
        for rec in records:
            app.emit(rec)

    return live_search(app, peers, level, pairs, text, limit, parse_age(wait, "--wait"), show)


# -- peers' catalogs -----------------------------------------------------------------
PEER_FIELDS = ("peer", "catalog_updated_at")  # every record from a catalog carries them


def catalog_peers(config, name: str) -> list[str]:
    """The configured peers that ``--peer NAME`` names; a usage error for any other name."""
    configured = sorted(config.section("peers"))
    if name == "all":
        if not configured:
            raise UsageError(f"--peer all: no peers are configured in {config.path}; add [peers.NAME] tables "
                             "(see 'dseal peers')")
        return configured
    if name not in configured:
        known = ", ".join(configured) or "none"
        raise UsageError(f"--peer {name}: not a configured peer (configured: {known}); add [peers.{name}] "
                         f"to {config.path}, or use --peer all")
    return [name]


def _search_catalogs(app: cli.App, peer: str, level: str, pairs, text, field_list: list[str], limit, offset,
                     count_only: bool, table: bool):
    """Answer from the copies of the peers' catalogs in the index."""
    from ..index.peers import catalog_states

    names = catalog_peers(app.config, peer)
    scope = peer_scope(names)
    wanted = []
    for f in field_list:
        key = normalize_key(f)
        if key in PEER_FIELDS:
            continue
        if key not in KEY_LEVEL or KEY_LEVEL[key] not in scope.levels:
            raise UsageError(f"unknown field {f!r} for a peer's catalog; fields are: {', '.join(PEER_FIELDS)}, "
                             f"{allowed_keys_text(scope)}")
        wanted.append(key)
    q = parse_keys(level, pairs, text, scope=scope)
    if not app.config.index_path.exists():
        states: dict = {}
        conn = None
    else:
        conn = open_index(app.config.index_path, readonly=True)
        states = catalog_states(conn)
    try:
        missing = [n for n in names if n not in states]
        if missing:
            app.info(f"no catalog has arrived yet from {', '.join(missing)}; a peer sends its catalog when it "
                     "grants this site 'share' (the receive job applies it), or ask it directly with --live")
        if conn is None or len(missing) == len(names):
            results: Iterator[dict] = iter(())
            if count_only:
                sys.stdout.write("0\n")
                return None
        elif count_only:
            sys.stdout.write(f"{count(conn, q)}\n")
            return None
        else:
            stamps = {n: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(states[n].updated_at))
                      for n in names if n in states}
            # --fields peer alone: records with nothing but where they come from
            only = wanted or (["peer"] if field_list else None)
            results = (_with_stamp(rec, stamps) for rec in run_query(conn, q, fields=only, limit=limit, offset=offset))
        if table:
            _print_table(app, level, results, list(PEER_FIELDS[:1]) + (wanted or TABLE_FIELDS[level]))
            return None
        n = 0
        for rec in results:
            app.emit(rec)
            n += 1
        app.log.info("%d %s record%s from %s", n, level, "" if n == 1 else "s", ", ".join(names))
    finally:
        if conn is not None:
            conn.close()
    return None


def _with_stamp(rec: dict, stamps: dict[str, str]) -> dict:
    """``catalog_updated_at`` right after ``peer``: when that peer's catalog was last applied here."""
    out = {"kind": rec.pop("kind"), "peer": rec.pop("peer")}
    out["catalog_updated_at"] = stamps.get(out["peer"])
    out.update(rec)
    return out


def _print_table(app: cli.App, level: str, results, columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    n = 0
    for rec in results:
        row = []
        for c in columns:
            v = rec.get(c)
            row.append("" if v is None else ("\\".join(map(str, v)) if isinstance(v, list) else str(v)))
        t.add_row(*row)
        n += 1
    # piped tables (dsearch --table | less) should not wrap at 80 columns
    Console(width=None if sys.stdout.isatty() else 200).print(t)
    plural = {"patient": "patients", "study": "studies", "series": "series", "instance": "instances"}
    app.info(f"{n} {level if n == 1 else plural[level]}")


main = cli.entry(dsearch)

if __name__ == "__main__":
    cli.run(dsearch)
