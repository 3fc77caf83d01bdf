"""Publishing a site's catalog and applying it at a peer: the diff and its versions, what
each peer is sent, crashes between sealing and advancing, lost envelopes, withdrawal, and
the receiving copy matching the holder's own search at every level."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from catalog_sites import (grant, index_files, local_rows, open_envelopes, peer_rows, publish, unindex,
                           write_studies)
from dtools.errors import InputError
from dtools.exchange.ledger import Ledger, ledger_path
from dtools.index.db import open_index
from dtools.index.query import find, peer_scope
from dtools.remote import catalog as catalog_mod
from dtools.seal import envelope
from dtools.seal.format import Entry
from dtools.seal.keys import load_identity, load_peers
from mailsites import make_sites

LEVELS = ("patient", "study", "series")


@pytest.fixture
def sites(tmp_path):
    homes = make_sites(tmp_path / "sites", f"maildir:{tmp_path / 'relay'}", ("site-a", "site-b", "site-c"))
    grant(homes["site-b"], "site-a")
    return homes


def ledger_rows(home) -> list[tuple]:
    db = sqlite3.connect(ledger_path(home))
    try:
        return db.execute("SELECT level, uid, hash, version, removed FROM catalog_rows ORDER BY version").fetchall()
    finally:
        db.close()


def published(home) -> dict[str, int]:
    db = sqlite3.connect(ledger_path(home))
    try:
        return dict(db.execute("SELECT peer, published_version FROM catalog_peers"))
    finally:
        db.close()


def assert_same_catalog(a, b):
    for level in LEVELS:
        assert peer_rows(a, "site-b", level) == local_rows(b, level), level


def test_first_publication_is_complete_and_the_copy_equals_the_holders_search(sites, tmp_path):
    a, b = sites["site-a"], sites["site-b"]
    index_files(b, write_studies(tmp_path / "b", 0, 5))
    recs = publish(b)
    assert [r["to"] for r in recs] == [["site-a"]]  # site-c is granted nothing
    cat = recs[0]["catalog"]
    rows = ledger_rows(b)
    # 5 studies of 2 series; patients 0..4: 5 + 5 + 10 rows, versions 1..20, the complete catalog 21
    assert len(rows) == 20 and [r[3] for r in rows] == list(range(1, 21))
    assert cat == {"since": 0, "through": 21, "full": True, "rows": 20, "removed": 0}
    assert published(b) == {"site-a": 21}
    (res,) = open_envelopes(a, recs)
    assert res.records == [] and res.catalog.rows == 20
    assert_same_catalog(a, b)
    # a patient's catalog key is a digest of its index key: no PatientID in the ledger
    assert not any("PID" in r[1] for r in rows)


def test_nothing_changed_publishes_nothing_and_versions_nothing(sites, tmp_path):
    b = sites["site-b"]
    index_files(b, write_studies(tmp_path / "b", 0, 3))
    publish(b)
    before = ledger_rows(b)
    assert publish(b) == []
    assert publish(b, rescan=True) == []
    index_files(b, write_studies(tmp_path / "b", 0, 3))  # the same files again: rows rewritten, unchanged
    assert publish(b) == []
    assert ledger_rows(b) == before


def test_additions_travel_as_an_increment_with_new_versions(sites, tmp_path):
    a, b = sites["site-a"], sites["site-b"]
    index_files(b, write_studies(tmp_path / "b", 0, 3))
    open_envelopes(a, publish(b))
    through = published(b)["site-a"]
    # one new study for a new patient, one new series in an existing study (patient 0's)
    index_files(b, write_studies(tmp_path / "b", 10, 1, patient=7)
                + write_studies(tmp_path / "b2", 0, 1, series=3)[-2:])
    (rec,) = publish(b)
    cat = rec["catalog"]
    assert cat["since"] == through and not cat["full"] and cat["removed"] == 0
    # new patient + study + 2 series; for the series added: the series, its study and patient (counts)
    assert cat["rows"] == 4 + 3
    assert min(v for *_, v, _r in ledger_rows(b)[-7:]) == through + 1
    open_envelopes(a, [rec])
    assert_same_catalog(a, b)


def test_a_prune_travels_as_removals_and_the_copy_follows(sites, tmp_path):
    a, b = sites["site-a"], sites["site-b"]
    files = write_studies(tmp_path / "b", 0, 4)
    index_files(b, files)
    open_envelopes(a, publish(b))
    gone = [p for p in files if "study0001" in str(p)]  # the whole study (and its patient, alone there)
    for p in gone:
        p.unlink()
    unindex(b, gone)
    (rec,) = publish(b)
    assert rec["catalog"]["removed"] == 1 + 1 + 2 and rec["catalog"]["rows"] == 0
    assert sum(1 for r in ledger_rows(b) if r[4]) == 4
    open_envelopes(a, [rec])
    assert_same_catalog(a, b)
    assert len(peer_rows(a, "site-b", "study")) == 3


def test_a_rebuilt_index_is_compared_whole(sites, tmp_path):
    a, b = sites["site-a"], sites["site-b"]
    files = write_studies(tmp_path / "b", 0, 3)
    index_files(b, files)
    open_envelopes(a, publish(b))
    for suffix in ("", "-wal", "-shm"):
        (b / f"index.db{suffix}").unlink(missing_ok=True)
    index_files(b, [p for p in files if "study0002" not in str(p)])  # one study's files are gone
    (rec,) = publish(b)
    # nothing else changed: only the study, its series and its patient go
    assert rec["catalog"]["rows"] == 0 and rec["catalog"]["removed"] == 4
    open_envelopes(a, [rec])
    assert_same_catalog(a, b)


def test_killed_between_sealing_and_advancing_sends_again_harmlessly(sites, tmp_path, monkeypatch):
    a, b = sites["site-a"], sites["site-b"]
    index_files(b, write_studies(tmp_path / "b", 0, 2))
    open_envelopes(a, publish(b))
    index_files(b, write_studies(tmp_path / "b", 5, 1))

    def killed(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(catalog_mod, "_advance", killed)
    with pytest.raises(KeyboardInterrupt):
        publish(b)
    monkeypatch.undo()
    first = sorted((b / "outbox").glob("*.dtenv"), key=lambda p: p.stat().st_mtime)[-1]
    (again,) = publish(b)  # the mark did not move: the same rows again, in a new envelope
    # study 5 is patient 5's only study: patient, study and two series
    assert again["catalog"]["rows"] == 4 and again["path"] != str(first)
    res = open_envelopes(a, [{"path": str(first)}, again])
    assert res[0].catalog.rows == 4 and res[1].catalog.rows == 0 and res[1].catalog.ignored == 4
    assert_same_catalog(a, b)
    assert publish(b) == []


def test_a_lost_catalog_envelope_is_sent_again(sites, tmp_path):
    a, b = sites["site-a"], sites["site-b"]
    index_files(b, write_studies(tmp_path / "b", 0, 2))
    open_envelopes(a, publish(b))
    index_files(b, write_studies(tmp_path / "b", 5, 1))
    (lost,) = publish(b)
    led = Ledger(ledger_path(b))
    try:
        led.mark_lost(lost["envelope_id"], "site-a")  # what dmail-send records for a file gone before deposit
    finally:
        led.close()
    (again,) = publish(b)
    assert again["catalog"]["since"] == lost["catalog"]["since"] and again["catalog"]["rows"] == 4
    open_envelopes(a, [again])
    assert_same_catalog(a, b)


def test_only_granted_peers_get_it_and_a_withdrawn_grant_clears_the_copy(sites, tmp_path):
    a, b, c = sites["site-a"], sites["site-b"], sites["site-c"]
    index_files(b, write_studies(tmp_path / "b", 0, 2))
    open_envelopes(a, publish(b))
    assert len(peer_rows(a, "site-b", "study")) == 2
    grant(b, "site-a", value="false")
    grant(b, "site-c")
    recs = publish(b)
    by_peer = {r["to"][0]: r for r in recs}
    assert by_peer["site-a"]["catalog"]["full"] and by_peer["site-a"]["catalog"]["rows"] == 0
    assert by_peer["site-c"]["catalog"]["rows"] == 2 + 2 + 4
    assert published(b) == {"site-c": by_peer["site-c"]["catalog"]["through"]}
    open_envelopes(a, [by_peer["site-a"]])
    open_envelopes(c, [by_peer["site-c"]])
    assert peer_rows(a, "site-b", "study") == []
    assert peer_rows(c, "site-b", "study") == local_rows(b, "study")
    # granted again: a complete catalog with a later version than the withdrawal
    grant(b, "site-a")
    (rec,) = publish(b)
    assert rec["catalog"]["full"] and rec["catalog"]["through"] > by_peer["site-a"]["catalog"]["through"]
    open_envelopes(a, [rec])
    assert_same_catalog(a, b)


def test_a_catalog_is_refused_unless_signed_with_a_key(sites, tmp_path):
    from dtools.config import Config
    from dtools.seal.opening import Opener

    a, b = sites["site-a"], sites["site-b"]
    index_files(b, write_studies(tmp_path / "b", 0, 1))
    (rec,) = publish(b)
    secret = b"a long shared passphrase here"
    path, eid = tmp_path / "pass.dtenv", envelope.new_envelope_id()
    with open(path, "wb") as f:
        envelope.seal(f, eid, [Entry.message("catalog", b"{}")], sender="site-b", recipient_names=["site-a"],
                      passphrase=secret)
    config = Config(a)
    opener = Opener(config, load_identity(config), load_peers(config), passphrase=secret)
    try:
        with pytest.raises(InputError, match="passphrase"):
            opener.open(path, record=True)
        assert opener.ledger.opened(eid) is None  # refused: not opened, so not applied
        assert opener.open(Path(rec["path"]), record=True).catalog.rows == 4
    finally:
        opener.close()


def test_a_peer_touches_only_its_own_copy(sites, tmp_path):
    """site-c seals a catalog that names site-b's study: it lands in site-c's copy only."""
    a, b, c = sites["site-a"], sites["site-b"], sites["site-c"]
    index_files(b, write_studies(tmp_path / "b", 0, 2))
    grant(c, "site-a")
    index_files(c, write_studies(tmp_path / "c", 0, 1))  # the same first study UID as site-b's
    open_envelopes(a, publish(b) + publish(c))
    assert len(peer_rows(a, "site-b", "study")) == 2 and len(peer_rows(a, "site-c", "study")) == 1
    for suffix in ("", "-wal", "-shm"):
        (c / f"index.db{suffix}").unlink(missing_ok=True)
    index_files(c, [])
    open_envelopes(a, publish(c))  # site-c's study is gone: its removal cannot reach site-b's copy
    assert len(peer_rows(a, "site-b", "study")) == 2 and peer_rows(a, "site-c", "study") == []


def test_the_copy_answers_like_the_holder_for_every_matching_rule(sites, tmp_path):
    a, b = sites["site-a"], sites["site-b"]
    index_files(b, write_studies(tmp_path / "b", 0, 9, series=2, instances=1))
    open_envelopes(a, publish(b))
    queries = [
        ("study", {"PatientName": "smith*"}), ("study", {"StudyDate": "20260201-20260531"}),
        ("study", {"ModalitiesInStudy": "MR"}), ("study", {"Modality": "CT"}),
        ("series", {"Modality": "MR", "StudyDate": "-20260401"}), ("patient", {"PatientID": "PID0000?"}),
        ("patient", {"Modality": "MR"}), ("series", {"SeriesNumber": "2"}),
        ("study", {"StudyInstanceUID": local_rows(b, "study")[0]["StudyInstanceUID"]}),
        ("series", {"PatientName": "Müller^Jürgen"}), ("study", {"ModalitiesInStudy": "C*"}),
    ]
    conn_b = open_index(b / "index.db", readonly=True)
    try:
        for level, keys in queries:
            want = sorted(str(r) for r in find(conn_b, level, keys))
            got = peer_rows(a, "site-b", level, keys)
            assert sorted(str(r) for r in got) == want, (level, keys)
            assert want, (level, keys)  # every case matches something
    finally:
        conn_b.close()


def test_peer_scope_refuses_what_a_catalog_does_not_hold(sites):
    conn = open_index(sites["site-a"] / "index.db")
    try:
        scope = peer_scope(["site-b"])
        with pytest.raises(Exception, match="--live"):
            list(find(conn, "instance", {}, scope=scope))
        with pytest.raises(Exception, match="free text.*--live"):
            list(find(conn, "study", {}, text="chest", scope=scope))
        with pytest.raises(Exception, match="SOPClassUID is an instance attribute.*--live"):
            list(find(conn, "study", {"SOPClassUID": "1.2"}, scope=scope))
        # C-FIND style (strict=False) ignores what the catalog does not store
        assert list(find(conn, "study", {"SOPClassUID": "1.2"}, scope=scope, strict=False)) == []
    finally:
        conn.close()


def test_no_share_grant_and_no_peer_costs_nothing(sites, tmp_path):
    c = sites["site-c"]
    index_files(c, write_studies(tmp_path / "c", 0, 1))
    assert publish(c) == []
    assert ledger_rows(c) == []
