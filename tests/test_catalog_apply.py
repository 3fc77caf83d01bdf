"""Applying catalog updates at the receiving site: replays, updates out of order, removals
racing additions, children before parents, complete catalogs, a catalog started over,
and the message format refusing what a hostile peer could send."""

from __future__ import annotations

import orjson
import pytest

from dtools.errors import InputError
from dtools.index.catalog import ATTRS, Row
from dtools.index.db import open_index
from dtools.index.peers import Update, apply_update
from dtools.index.query import find, peer_scope
from dtools.remote import catalog_message

CAT = "a" * 32
STUDY = "1.2.3.1"


def values(level: str, **kw) -> tuple:
    return tuple(kw.get(k) for k in ATTRS[level])


def patient(version, key="p1", name="DOE^JANE"):
    return version, key, None, values("patient", PatientName=name, PatientID="ID1", NumberOfPatientRelatedStudies=1)


def study(version, uid=STUDY, desc="CT HEAD", parent="p1"):
    return version, uid, parent, values("study", StudyInstanceUID=uid, StudyDescription=desc, StudyDate="20260101")


def series(version, uid="1.2.3.1.1", parent=STUDY, modality="CT"):
    return version, uid, parent, values("series", SeriesInstanceUID=uid, Modality=modality, SeriesNumber=1)


def update(through, rows=(), removed=(), full=False, since=0, catalog=CAT, created=1000.0) -> Update:
    u = Update(catalog, created, 2000.0, since, through, full)
    for level, row in rows:
        u.rows.setdefault(level, []).append(row)
    for level, uid, version in removed:
        u.removed.setdefault(level, []).append((uid, version))
    return u


@pytest.fixture
def conn(tmp_path):
    c = open_index(tmp_path / "index.db")
    yield c
    c.close()


def studies(conn, peer="site-b"):
    return [(r.get("StudyDescription"), r.get("PatientName")) for r in find(conn, "study", {}, scope=peer_scope([peer]))]


def test_a_replayed_update_changes_nothing(conn):
    u = update(3, [("patient", patient(1)), ("study", study(2)), ("series", series(3))])
    first = apply_update(conn, "site-b", u)
    assert (first.rows, first.ignored) == (3, 0)
    again = apply_update(conn, "site-b", u)
    assert (again.rows, again.ignored) == (0, 3)
    assert studies(conn) == [("CT HEAD", "DOE^JANE")]


def test_an_older_update_arriving_late_never_rolls_back(conn):
    old = update(2, [("patient", patient(1)), ("study", study(2, desc="OLD"))])
    new = update(5, [("study", study(5, desc="NEW"))], since=2)
    apply_update(conn, "site-b", new)
    apply_update(conn, "site-b", old)  # its patient is new here, its study older than the one kept
    assert studies(conn) == [("NEW", "DOE^JANE")]


def test_a_removal_wins_over_an_older_addition_that_comes_after_it(conn):
    apply_update(conn, "site-b", update(2, [("patient", patient(1)), ("study", study(2))]))
    apply_update(conn, "site-b", update(6, removed=[("study", STUDY, 6)], since=4))
    assert studies(conn) == []
    late = apply_update(conn, "site-b", update(4, [("study", study(4, desc="CHANGED"))], since=2))
    assert late.rows == 0 and studies(conn) == []
    # a newer addition after the removal brings it back
    apply_update(conn, "site-b", update(7, [("study", study(7, desc="BACK"))], since=6))
    assert studies(conn) == [("BACK", "DOE^JANE")]


def test_a_removal_older_than_the_row_is_ignored(conn):
    apply_update(conn, "site-b", update(5, [("patient", patient(1)), ("study", study(5))]))
    r = apply_update(conn, "site-b", update(3, removed=[("study", STUDY, 3)], since=2))
    assert r.removed == 0 and studies(conn) == [("CT HEAD", "DOE^JANE")]


def test_children_that_arrive_before_their_parents_are_joined_when_they_come(conn):
    apply_update(conn, "site-b", update(9, [("series", series(9))], since=5))
    assert list(find(conn, "series", {}, scope=peer_scope(["site-b"]))) == []  # no study to join yet
    apply_update(conn, "site-b", update(5, [("study", study(5))], since=3))
    assert studies(conn) == []  # and no patient yet
    apply_update(conn, "site-b", update(3, [("patient", patient(3))]))
    rows = list(find(conn, "series", {"Modality": "CT"}, scope=peer_scope(["site-b"])))
    assert [(r["peer"], r["PatientName"], r["StudyInstanceUID"]) for r in rows] == [("site-b", "DOE^JANE", STUDY)]


def test_a_removed_parent_leaves_its_children_waiting_for_a_new_one(conn):
    apply_update(conn, "site-b", update(3, [("patient", patient(1)), ("study", study(2)), ("series", series(3))]))
    # the study moves to another patient (a corrected PatientID): new patient, study changed, old patient gone
    apply_update(conn, "site-b", update(6, [("patient", patient(4, key="p2", name="ROE^RICHARD")),
                                            ("study", study(5, parent="p2"))], removed=[("patient", "p1", 6)],
                                         since=3))
    assert studies(conn) == [("CT HEAD", "ROE^RICHARD")]
    assert [r["PatientName"] for r in find(conn, "patient", {}, scope=peer_scope(["site-b"]))] == ["ROE^RICHARD"]


def test_a_complete_catalog_drops_what_it_does_not_list(conn):
    apply_update(conn, "site-b", update(4, [("patient", patient(1)), ("study", study(2)),
                                            ("study", study(3, uid="1.2.3.2", desc="MR KNEE"))]))
    full = update(10, [("patient", patient(1)), ("study", study(2))], full=True)
    apply_update(conn, "site-b", full)
    assert studies(conn) == [("CT HEAD", "DOE^JANE")]
    # an increment from before the complete catalog cannot bring the dropped study back
    late = apply_update(conn, "site-b", update(4, [("study", study(3, uid="1.2.3.2", desc="MR KNEE"))], since=2))
    assert late.rows == 0 and studies(conn) == [("CT HEAD", "DOE^JANE")]


def test_of_two_complete_catalogs_the_later_wins_in_any_order(conn):
    withdrawal = update(10, full=True, since=4)
    regrant = update(11, [("patient", patient(1)), ("study", study(2))], full=True)
    apply_update(conn, "site-b", regrant)
    assert apply_update(conn, "site-b", withdrawal).stale
    assert studies(conn) == [("CT HEAD", "DOE^JANE")]
    apply_update(conn, "site-c", withdrawal)
    apply_update(conn, "site-c", regrant)  # listed rows older than the withdrawal come back with the grant
    assert studies(conn, "site-c") == [("CT HEAD", "DOE^JANE")]


def test_a_catalog_started_over_replaces_the_copy_and_the_old_one_is_ignored(conn):
    apply_update(conn, "site-b", update(50, [("patient", patient(40)), ("study", study(50, desc="OLD LINE"))]))
    fresh = update(3, [("patient", patient(1)), ("study", study(2, uid="1.2.3.9", desc="NEW LINE"))], full=True,
                   catalog="b" * 32, created=5000.0)
    apply_update(conn, "site-b", fresh)
    assert studies(conn) == [("NEW LINE", "DOE^JANE")]
    stale = apply_update(conn, "site-b", update(60, [("study", study(60, desc="OLD LINE"))], since=50))
    assert stale.stale and studies(conn) == [("NEW LINE", "DOE^JANE")]


def test_updates_of_one_peer_never_touch_another(conn):
    apply_update(conn, "site-b", update(2, [("patient", patient(1)), ("study", study(2))]))
    apply_update(conn, "site-c", update(9, removed=[("study", STUDY, 9), ("patient", "p1", 9)]))
    apply_update(conn, "site-c", update(10, full=True))
    assert studies(conn) == [("CT HEAD", "DOE^JANE")]


# -- the message format ---------------------------------------------------------------------
def rows_of(*rows):
    return [(r[0], Row(level, r[1], r[2], r[3])) for level, r in rows]


def test_encode_decode_round_trip_in_parts():
    rows = rows_of(("patient", patient(1)), ("study", study(2)), *[("series", series(3 + i, uid=f"1.2.3.1.{i}"))
                                                                    for i in range(5)])
    parts = catalog_message.encode(catalog_id=CAT, created_at=1.5, generated_at=2.5, since=0, through=9, full=True,
                                   rows=rows, removed=[("study", "1.2.9", 8)], per_part=3)
    assert len(parts) == 3
    u = catalog_message.decode(list(reversed(parts)))
    assert (u.catalog_id, u.since, u.through, u.full, u.created_at) == (CAT, 0, 9, True, 1.5)
    assert len(u.rows["series"]) == 5 and u.rows["patient"][0] == patient(1)
    assert u.removed == {"study": [("1.2.9", 8)]}
    # no file paths and no 'peer': nothing in the message says whose catalog it is
    for p in parts:
        obj = orjson.loads(p)
        assert "peer" not in obj and "path" not in str(obj.get("rows"))


def good(**change) -> dict:
    obj = orjson.loads(catalog_message.encode(catalog_id=CAT, created_at=1.0, generated_at=2.0, since=0, through=5,
                                              full=False, rows=rows_of(("study", study(2))), removed=[])[0])
    obj.update(change)
    return obj


@pytest.mark.parametrize("obj, reason", [
    (good(format=2), "format"),
    (good(catalog="../x"), "catalog id"),
    (good(through=-1), "through"),
    (good(since=9), "since"),
    (good(parts=2), "1 of its 2 parts"),
    (good(rows={"instance": {"fields": [], "values": []}}), "unknown level"),
    (good(rows={"study": {"fields": ["version", "patient", "StudyInstanceUID"], "values": [[9, "p", "1.2"]]}}),
     "version"),
    (good(rows={"study": {"fields": ["version", "patient", "StudyInstanceUID"], "values": [[1, "p", "../etc"]]}}),
     "not a valid DICOM UID"),
    (good(rows={"study": {"fields": ["version", "patient", "StudyInstanceUID", "StudyDescription"],
                          "values": [[1, "p", "1.2", "x" * 5000]]}}), "at most"),
    (good(rows={"study": {"fields": ["version", "patient", "StudyInstanceUID", "NumberOfStudyRelatedSeries"],
                          "values": [[1, "p", "1.2", "many"]]}}), "not a number"),
    (good(rows={"study": {"fields": ["version", "StudyInstanceUID"], "values": []}}), "no valid fields"),
    (good(rows={"series": {"fields": ["version", "study", "SeriesInstanceUID"], "values": [[1, "1.2", "1.3", 4]]}}),
     "does not match"),
    (good(removed={"study": [["1.2"]]}), "removal"),
    (good(removed={"patient": [["p\n", 1]]}), "key"),
    ([1, 2], "not a JSON object"),
])
def test_malformed_messages_are_refused(obj, reason):
    with pytest.raises(InputError, match=reason):
        catalog_message.decode([orjson.dumps(obj)])


def test_parts_of_different_updates_or_twice_the_same_part_are_refused():
    a = orjson.dumps(good(parts=2, part=1))
    with pytest.raises(InputError, match="twice"):
        catalog_message.decode([a, a])
    with pytest.raises(InputError, match="different updates"):
        catalog_message.decode([a, orjson.dumps(good(parts=2, part=2, through=4))])
    with pytest.raises(InputError, match="not valid JSON"):
        catalog_message.decode([b"{"])
