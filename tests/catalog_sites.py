"""Sites that publish and apply catalogs in-process: a holder's index, its ledger, and a
receiver that opens the catalog envelopes as 'dseal --open' does."""

from __future__ import annotations

from pathlib import Path

from dtools.config import Config
from dtools.exchange.ledger import Ledger, ledger_path
from dtools.index.db import open_index
from dtools.index.ingest import Indexer
from dtools.index.query import find, peer_scope
from dtools.remote.catalog import publish_catalog
from dtools.sample import make_instance
from dtools.seal.keys import load_identity, load_peers
from dtools.seal.opening import Opener

CATALOG_LEVELS = ("patient", "study", "series")


def grant(home: Path, peer: str, what: str = "share", value: str = "true") -> None:
    """Set ``what = value`` in ``[peers.PEER]`` of a home's config.toml (the table exists)."""
    path = home / "config.toml"
    lines = path.read_text().splitlines()
    start = lines.index(f"[peers.{peer}]") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("[")), len(lines))
    body = [ln for ln in lines[start:end] if ln.split("=")[0].strip() != what] + [f"{what} = {value}"]
    path.write_text("\n".join(lines[:start] + body + lines[end:]) + "\n")


def write_studies(directory: Path, first: int, count: int, series: int = 2, instances: int = 2,
                  patient: int | None = None) -> list[Path]:
    """Studies numbered first.. (distinct UIDs for distinct numbers), CT and MR alternately."""
    paths = []
    for s in range(first, first + count):
        mod = "CT" if s % 2 == 0 else "MR"
        for se in range(series):
            for n in range(instances):
                ds = make_instance(mod, s % 8 if patient is None else patient, s, se, n,
                                   date=f"2026{1 + s % 12:02d}{10 + s % 18:02d}")
                p = directory / f"study{s:04d}" / f"series{se}" / f"{n:03d}.dcm"
                p.parent.mkdir(parents=True, exist_ok=True)
                ds.save_as(p, enforce_file_format=True)
                paths.append(p)
    return paths


def index_files(home: Path, paths: list[Path]) -> None:
    conn = open_index(home / "index.db")
    try:
        with Indexer(conn) as ix:
            for p in paths:
                ix.add(p)
    finally:
        conn.close()


def unindex(home: Path, paths: list[Path]) -> None:
    """What 'dindex --prune' does once the files are gone."""
    conn = open_index(home / "index.db")
    try:
        with Indexer(conn) as ix:
            ix.remove_paths([str(p) for p in paths])
    finally:
        conn.close()


def publish(home: Path, **kw) -> list[dict]:
    config = Config(home)
    ledger = Ledger(ledger_path(home))
    try:
        return publish_catalog(config, ledger, **kw)
    finally:
        ledger.close()


def open_envelopes(home: Path, records: list[dict]):
    """Open envelopes at ``home`` as 'dseal --open' does (index, messages, ledger)."""
    config = Config(home)
    opener = Opener(config, load_identity(config), load_peers(config))
    try:
        return [opener.open(Path(r["path"]), record=True) for r in records]
    finally:
        opener.close()


def local_rows(home: Path, level: str) -> list[dict]:
    conn = open_index(home / "index.db", readonly=True)
    try:
        return sorted((dict(r) for r in find(conn, level, {})), key=_key)
    finally:
        conn.close()


def peer_rows(home: Path, peer: str, level: str, keys: dict | None = None) -> list[dict]:
    conn = open_index(home / "index.db", readonly=True)
    try:
        out = []
        for r in find(conn, level, keys or {}, scope=peer_scope([peer])):
            assert r.pop("peer") == peer
            out.append(r)
        return sorted(out, key=_key)
    finally:
        conn.close()


def _key(r: dict) -> tuple:
    return (r.get("PatientID") or "", r.get("StudyInstanceUID") or "", r.get("SeriesInstanceUID") or "")
