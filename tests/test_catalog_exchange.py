"""A site's catalog through the relay, end to end, with the README's receive line.

Three sites: B grants A 'share', C nothing. B publishes (as 'dserve --relay' does each
pass) and deposits with its ordinary dmail-send; A's receive job applies the catalog,
and 'dsearch --peer site-b' at A answers what B's own dsearch answers, after additions
and after a prune at B. C gets nothing. The mail store never holds patient data in
clear. Over the Maildir relay and over a real Dovecot.
"""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest

from catalog_sites import grant, publish, write_studies
from conftest import require_tool
from dovecot import Dovecot
from exchange import Exchange

NAMES = ("site-a", "site-b", "site-c")
PROVENANCE = ("peer", "catalog_updated_at")


@pytest.fixture(scope="module")
def dovecot():
    with Dovecot(require_tool("dovecot")) as dc:
        yield dc


def maildir_exchange(tmp_path) -> tuple[Exchange, Path]:
    return Exchange(tmp_path, f"maildir:{tmp_path}/relay", names=NAMES), tmp_path / "relay"


def dovecot_exchange(tmp_path, dc: Dovecot, name: str) -> tuple[Exchange, Path]:
    base = "c" + str(abs(hash(name)) % 10**8)
    return Exchange(tmp_path, dc.url.replace("/dtools", f"/{base}"), env=dc.env(), names=NAMES), dc.maildir()


def mail_files(store: Path) -> list[Path]:
    return [p for p in store.rglob("*") if p.is_file() and p.parent.name in ("new", "cur")]


def clear_text(path: Path) -> bytes:
    """A stored message as anyone with the mail store reads it: raw, plus every part decoded."""
    raw = path.read_bytes()
    out = [raw]
    for part in email.message_from_bytes(raw, policy=email.policy.default).walk():
        if not part.is_multipart():
            out.append(part.get_payload(decode=True) or b"")
    return b"\n".join(out)


def patient_data(records: list[dict]) -> set[bytes]:
    needles = set()
    for r in records:
        for key in ("PatientName", "PatientID", "PatientBirthDate", "StudyDescription", "AccessionNumber"):
            if r.get(key):
                needles.add(str(r[key]).encode("utf-8"))
                needles.add(str(r[key]).split("^")[0].encode("utf-8"))
    return needles


def own(ex: Exchange, level: str) -> list[dict]:
    return sorted(ex.ok("site-b", f"dsearch --level {level}").records, key=str)


def copy(ex: Exchange, site: str, level: str) -> list[dict]:
    out = ex.ok(site, f"dsearch --peer site-b --level {level}").records
    for r in out:
        assert r["peer"] == "site-b" and r["catalog_updated_at"].endswith("Z")
    return sorted(({k: v for k, v in r.items() if k not in PROVENANCE} for r in out), key=str)


def publish_and_deposit(ex: Exchange) -> list[dict]:
    recs = publish(ex.home("site-b"))
    sent = ex.ok("site-b", "dmail-send").kinds("message")  # the catch-up deposits what was sealed
    assert sorted(m["envelope_id"] for m in sent) == sorted(r["envelope_id"] for r in recs)
    return recs


def scenario(ex: Exchange, store: Path, data: Path) -> None:
    grant(ex.home("site-b"), "site-a")
    files = write_studies(data, 0, 4)
    ex.ok("site-b", f"dindex -q {data} >/dev/null")
    recs = publish_and_deposit(ex)
    assert [r["to"] for r in recs] == [["site-a"]]
    stored = mail_files(store)
    assert stored
    needles = patient_data(own(ex, "study"))
    assert needles
    for f in stored:
        text = clear_text(f)
        assert not [n for n in needles if n in text], f"patient data in clear in {f}"

    got = ex.receive("site-a")
    assert got.kinds("instance") == []  # a catalog puts nothing in the archive
    for level in ("patient", "study", "series"):
        assert copy(ex, "site-a", level) == own(ex, level), level
    ex.receive("site-c")
    c = ex.sh("site-c", "dsearch --peer site-b")
    assert c.code == 0 and c.records == [] and "no catalog has arrived yet from site-b" in c.stderr
    assert ex.opened_envelopes("site-c") == []

    # additions at B: new studies, and a new series in a study A already knows
    more = write_studies(data / "more", 10, 2) + write_studies(data / "late", 0, 1, series=3)[-2:]
    ex.ok("site-b", f"dindex -q {data} >/dev/null")
    (inc,) = publish_and_deposit(ex)
    assert not inc["catalog"]["full"] and inc["catalog"]["rows"] == 2 * 4 + 3
    ex.receive("site-a")
    for level in ("patient", "study", "series"):
        assert copy(ex, "site-a", level) == own(ex, level), level

    # a prune at B: one study's files are gone
    gone = [p for p in files + more if "study0002" in str(p)]
    for p in gone:
        p.unlink()
    ex.ok("site-b", f"dindex -q --prune {data} >/dev/null")
    (pr,) = publish_and_deposit(ex)
    # the study and its two series go; its patient stays (study 10 is its too) with new counts
    assert (pr["catalog"]["removed"], pr["catalog"]["rows"]) == (3, 1)
    ex.receive("site-a")
    for level in ("patient", "study", "series"):
        assert copy(ex, "site-a", level) == own(ex, level), level
    assert len(copy(ex, "site-a", "study")) == 5

    # receipts come back for the catalog envelopes as for studies; nothing is left to send
    receipts = ex.ok("site-b", "dmail-recv").kinds("receipt")
    assert sorted(r["envelope_id"] for r in receipts) == sorted(r["envelope_id"] for r in recs + [inc, pr])
    assert publish(ex.home("site-b")) == []


def test_catalog_over_the_maildir_relay(tmp_path):
    ex, store = maildir_exchange(tmp_path)
    scenario(ex, store, tmp_path / "data")


@pytest.mark.integration
def test_catalog_over_dovecot(tmp_path, dovecot, request):
    ex, store = dovecot_exchange(tmp_path, dovecot, request.node.name)
    scenario(ex, store, tmp_path / "data")


def test_dsearch_peer_options(tmp_path):
    ex, _store = maildir_exchange(tmp_path)
    grant(ex.home("site-b"), "site-a")
    write_studies(tmp_path / "data", 0, 3)
    ex.ok("site-b", f"dindex -q {tmp_path / 'data'} >/dev/null")
    publish_and_deposit(ex)
    ex.receive("site-a")
    assert ex.ok("site-a", "dsearch --peer site-b --count").stdout == "3\n"
    assert ex.ok("site-a", "dsearch --peer all --level series --count").stdout == "6\n"
    assert ex.ok("site-a", "dsearch --peer site-b Modality=MR --count").stdout == "1\n"
    one = ex.ok("site-a", "dsearch --peer site-b --fields StudyInstanceUID,PatientID --limit 1").records
    assert len(one) == 1 and list(one[0]) == ["kind", "peer", "catalog_updated_at", "StudyInstanceUID", "PatientID"]
    table = ex.ok("site-a", "dsearch --peer all --table")
    assert table.stdout.count("site-b") == 3 and "no catalog has arrived yet from site-c" in table.stderr
    q = ex.ok("site-a", "dsearch -q --peer site-c")
    assert q.stderr == "" and q.records == []
    for args, says in [
        ("--peer site-x", "not a configured peer"),
        ("--peer site-b --level instance", "--live"),
        ("--peer site-b chest", "free text"),
        ("--peer site-b SOPInstanceUID=1.2", "--live"),
        ("--peer site-b --fields path", "unknown field"),
    ]:
        bad = ex.sh("site-a", f"dsearch {args}")
        assert bad.code == 2 and says in bad.stderr and "Traceback" not in bad.stderr, args
        assert len(bad.stderr.strip().splitlines()) == 1


def served_publication(ex: Exchange, data: Path) -> None:
    """As an administrator runs it: 'dserve --relay --once' from cron publishes and deposits."""
    grant(ex.home("site-b"), "site-a")
    write_studies(data, 0, 3)
    ex.ok("site-b", f"dindex -q {data} >/dev/null")
    first = ex.ok("site-b", "dserve --relay --once")
    assert "published 1 catalog update(s)" in first.stderr
    ex.receive("site-a")
    for level in ("patient", "study", "series"):
        assert copy(ex, "site-a", level) == own(ex, level), level
    again = ex.ok("site-b", "dserve --relay --once")
    assert "published 0 catalog update(s)" in again.stderr
    write_studies(data / "more", 5, 1)
    ex.ok("site-b", f"dindex -q {data} >/dev/null")
    assert "published 1 catalog update(s)" in ex.ok("site-b", "dserve --relay --once").stderr
    ex.receive("site-a")
    assert copy(ex, "site-a", "study") == own(ex, "study") and len(own(ex, "study")) == 4


def test_dserve_relay_once_publishes_over_the_maildir_relay(tmp_path):
    ex, _store = maildir_exchange(tmp_path)
    served_publication(ex, tmp_path / "data")


@pytest.mark.integration
def test_dserve_relay_once_publishes_over_dovecot(tmp_path, dovecot, request):
    ex, _store = dovecot_exchange(tmp_path, dovecot, request.node.name)
    served_publication(ex, tmp_path / "data")
