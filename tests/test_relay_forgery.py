"""A stranger with write access to the relay, and a compromised peer: what they cannot do.

- A forged part copied from a genuine set's clear-text headers is set aside alone; the
  genuine set completes in the same run.
- Junk from senders nobody authenticated is reported once and never fails later runs.
- A known peer cannot replace an archived instance it did not send, nor deliver a payload
  that is not DICOM or does not carry the UIDs of its entry.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from exchange import Exchange
from dtools.mail import message as msg
from dtools.mail.message import part_payload_size
from mailsites import fake_envelope, lines
from test_seal_support import make_dicom


@pytest.fixture
def ex(tmp_path) -> Exchange:
    return Exchange(tmp_path, f"maildir:{tmp_path}/relay", names=("site-a", "site-b", "site-c"))


def folder(ex: Exchange, name: str) -> Path:
    return ex.root / "relay" / "dtools" / name


def files(ex: Exchange, name: str) -> list[Path]:
    d = folder(ex, name)
    return sorted(p for sub in ("new", "cur") if (d / sub).exists() for p in (d / sub).iterdir())


def inject(ex: Exchange, name: str, raw: bytes | bytearray, tag: str) -> None:
    d = folder(ex, name) / "new"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"stranger-{tag}").write_bytes(bytes(raw))


def test_a_forged_part_is_dropped_alone_and_the_genuine_set_completes(ex, tmp_path):
    a, b = ex.home("site-a"), ex.home("site-b")
    env = fake_envelope(a / "outbox", 200_000)
    ex.ok("site-a", "dmail-send --max-message-size 64K", stdin=lines([env]))
    genuine = files(ex, "site-b")
    assert len(genuine) > 2
    # The stranger copies the clear-text headers of part 2 and writes its own payload.
    head = genuine[1].read_bytes().split(b"\r\n\r\n", 1)[0]
    h = msg.check_headers(msg.parse_header_fields(head))
    junk = os.urandom(1000)
    forged = msg.build(msg.KIND_ENVELOPE, h.envelope_id, h.sender, h.to, junk, part=h.part, total=h.total,
                       envelope_sha256=h.envelope_sha256, envelope_bytes=h.envelope_bytes,
                       signature=h.signature)  # the genuine signature, over other bytes
    inject(ex, "site-b", forged, "1")
    # ...and once more with no signature at all, and with a made-up one.
    inject(ex, "site-b", msg.build(msg.KIND_ENVELOPE, h.envelope_id, h.sender, h.to, junk, part=h.part,
                                   total=h.total, envelope_sha256=h.envelope_sha256,
                                   envelope_bytes=h.envelope_bytes), "2")
    out = ex.sh("site-b", "dmail-recv")
    assert out.code == 1  # the forgeries are reported, once
    assert out.stderr.count("moved to relay folder dtools/site-b-quarantine") == 2
    [got] = out.kinds("envelope")
    assert Path(got["path"]).read_bytes() == Path(env["path"]).read_bytes()  # the same run
    assert files(ex, "site-b") == [] and len(files(ex, "site-b-quarantine")) == 2
    again = ex.sh("site-b", "dmail-recv --part-timeout 0s")
    assert again.code == 0, again.stderr  # junk never fails a later run, nor names a sender
    assert ex.status("site-b")["site-a"]["incomplete_sets"] == 0
    assert ex.status("site-b")["site-a"]["quarantined"] == 2


def test_junk_from_unknown_senders_is_reported_once(ex, tmp_path):
    junk = msg.build(msg.KIND_ENVELOPE, "ab" * 16, "site-x", "site-b", b"junk", envelope_sha256="0" * 64)
    inject(ex, "site-b", junk, "x")
    receipt = msg.build(msg.KIND_RECEIPT, "cd" * 16, "site-x", "site-b", b'{"kind":"receipt"}',
                        content_type="application/json", signature=b"\0" * 64)
    inject(ex, "site-b", receipt, "y")
    out = ex.sh("site-b", "dmail-recv")
    assert out.code == 1 and "site-x is not a configured peer" in out.stderr
    assert out.records == []
    for _ in range(2):
        later = ex.sh("site-b", "dmail-recv --part-timeout 0s")
        assert later.code == 0 and later.stderr.count("site-x") == 0
    st = ex.status("site-b")
    assert st["site-x"]["configured"] is False and st["site-x"]["quarantined"] == 2
    assert st["site-x"]["incomplete_sets"] == 0


def test_a_peer_cannot_replace_an_instance_it_did_not_send(ex, tmp_path):
    # Site A delivers a study to site B.
    ex.add_studies("site-a", tmp_path / "data", studies=1, instances=2)
    ex.send("site-a", "site-b")
    ex.receive("site-b")
    [victim, other] = ex.archive("site-b")
    original = victim.read_bytes()
    study, series, sop = victim.parent.parent.name, victim.parent.name, victim.stem
    # Compromised site C seals a file with the same UIDs and other content for B.
    forged = tmp_path / "forged.dcm"
    make_dicom(forged, study=study, series=series, sop=sop, pixels=64)
    sealed = ex.ok("site-c", f"dseal --to site-b {forged} | dmail-send")
    assert sealed.kinds("message")
    out = ex.sh("site-b", "dmail-recv | dseal --open | dindex")
    assert out.code == 1
    assert f"instance {sop} is already in the archive with other content, sent by site-a; not replaced" in out.stderr
    assert victim.read_bytes() == original
    found = ex.ok("site-b", f"dsearch -k SOPInstanceUID={sop}").kinds("instance")
    assert [r["path"] for r in found] == [str(victim)]


def test_the_same_peer_may_send_a_new_version_and_the_old_is_kept_aside(ex, tmp_path):
    ex.add_studies("site-a", tmp_path / "data", studies=1, instances=1)
    ex.send("site-a", "site-b")
    ex.receive("site-b")
    [placed] = ex.archive("site-b")
    old = placed.read_bytes()
    [src] = list((tmp_path / "data").rglob("*.dcm"))
    import pydicom

    ds = pydicom.dcmread(src)
    ds.StudyDescription = "CORRECTED"
    ds.save_as(src)
    ex.ok("site-a", f"dindex -q {tmp_path / 'data'} >/dev/null")
    ex.send("site-a", "site-b")
    out = ex.ok("site-b", "dmail-recv | dseal --open | dindex | dmail-send --receipts")
    assert "replaces the version site-a sent before; the old one is kept at" in out.stderr
    assert placed.read_bytes() == src.read_bytes()
    [aside] = list((ex.home("site-b") / "replaced").iterdir())
    assert aside.read_bytes() == old
    [study] = ex.ok("site-b", "dsearch --level study").kinds("study")
    assert study["StudyDescription"] == "CORRECTED"


def _seal_raw(ex: Exchange, tmp_path: Path, payload: bytes, uids: tuple[str, str, str]) -> Path:
    """An envelope, validly signed by site C, carrying ``payload`` under the given UIDs."""
    from dtools.config import Config
    from dtools.seal import envelope, keys

    src = tmp_path / "payload.bin"
    src.write_bytes(payload)
    cfg = Config(ex.home("site-c"))
    ident = keys.load_identity(cfg)
    eid = envelope.new_envelope_id()
    path = tmp_path / f"{eid}.dtenv"
    with open(path, "wb") as out:
        envelope.seal(out, eid, [envelope.Entry(*uids, len(payload), source=src)], identity=ident,
                      recipients=[keys.load_peers(cfg)["site-b"]])
    return path


@pytest.mark.parametrize("what", ["not-dicom", "other-uids"])
def test_a_payload_must_be_dicom_with_the_uids_of_its_entry(ex, tmp_path, what):
    uids = ("1.2.3", "1.2.3.4", "1.2.3.4.5")
    if what == "not-dicom":
        payload = b"21 bytes of not DICOM"
    else:
        f = tmp_path / "real.dcm"
        make_dicom(f, study="1.2.3", series="1.2.3.4", sop="1.2.3.4.999")
        payload = f.read_bytes()
    env = _seal_raw(ex, tmp_path, payload, uids)
    out = ex.sh("site-b", f"dseal --open {env}")
    assert out.code == 1 and "the envelope was refused" in out.stderr and "nothing was written" in out.stderr
    assert ex.archive("site-b") == []
    assert not (ex.home("site-b") / "archive" / "1.2.3").exists()


def test_part_signature_covers_every_header_the_receiver_acts_on(ex):
    from dtools.config import Config
    from dtools.seal import keys

    ident = keys.load_identity(Config(ex.home("site-a")))
    raw = msg.build(msg.KIND_ENVELOPE, "ab" * 16, "site-a", "site-b", b"x" * 10, part=1, total=2,
                    envelope_sha256="1" * 64, envelope_bytes=20, sign=ident.sign)
    head = bytes(raw).split(b"\r\n\r\n", 1)[0]
    h = msg.check_headers(msg.parse_header_fields(head))
    ident.public().verify(h.signature, h.statement())
    for old, new in ((b"X-Dtools-Part: 1/2", b"X-Dtools-Part: 2/2"), (b"X-Dtools-Envelope-Bytes: 20", b"X-Dtools-Envelope-Bytes: 21"),
                     (b"X-Dtools-To: site-b", b"X-Dtools-To: site-c")):
        h2 = msg.check_headers(msg.parse_header_fields(head.replace(old, new)))
        with pytest.raises(Exception, match="signature does not verify"):
            ident.public().verify(h2.signature, h2.statement())
