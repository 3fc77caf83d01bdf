"""The envelope format against tampering: flipped bytes, truncation, reordering, swapped
headers, wrong recipients, forged senders, hostile payload names and replays.

Every failure must leave the archive untouched and no temporary file behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import pytest
from test_seal_support import make_dicom, make_sites, make_study

from dtools.config import Config
from dtools.dicom.archive import AtomicFile
from dtools.errors import InputError
from dtools.seal import envelope, keys, pipeline, sealing
from dtools.seal.keys import Identity
from dtools.seal.opening import STAGING_PREFIX, Opener

SMALL = 4096  # small chunks so a few kilobytes span several chunks


class Site:
    def __init__(self, home: Path):
        self.home = home
        self.config = Config(home)
        self.identity = keys.load_identity(self.config)
        self.peers = keys.load_peers(self.config)

    def opener(self, passphrase: bytes | None = None) -> Opener:
        return Opener(self.config, self.identity, self.peers, passphrase)

    def archive_files(self) -> list[Path]:
        root = self.home / "archive"
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []

    def assert_untouched(self) -> None:
        assert self.archive_files() == []
        spool = self.home / "spool"
        assert not list(spool.glob(STAGING_PREFIX + "*")), "staging directory left behind"
        leftovers = [p for p in self.home.rglob("*") if p.name.endswith((".tmp", ".part"))]
        assert leftovers == []


@pytest.fixture
def sites(tmp_path) -> dict[str, Site]:
    homes = make_sites(tmp_path / "sites", ("site-a", "site-b", "site-c"))
    return {n: Site(h) for n, h in homes.items()}


@pytest.fixture
def study(tmp_path):
    # 3 files of ~5 kB: about four 4 KiB chunks.
    return make_study(tmp_path / "src", n=3, series=2, pixels=5000)


def entries_for(files) -> list[envelope.Entry]:
    return [sealing.entry_for({"path": str(f)}) for f in files]


def seal_file(out_dir: Path, sender: Site, to: list[str], files, chunk=SMALL, entries=None) -> Path:
    eid = envelope.new_envelope_id()
    path = out_dir / f"{eid}.dtenv"
    recipients = [sender.peers[n] for n in to]
    with open(path, "wb") as out:
        envelope.seal(out, eid, entries if entries is not None else entries_for(files),
                      identity=sender.identity, recipients=recipients, chunk=chunk)
    return path


def layout(path: Path) -> dict:
    """Offsets of the regions of an envelope file."""
    data = path.read_bytes()
    _m, _v, _r, hlen = envelope.PRELUDE.unpack(data[:12])
    head_end = 12 + hlen
    header = orjson.loads(data[12:head_end])
    trailer = envelope.SIG_LEN if header["mode"] == "x25519" else envelope.MAC_LEN
    step = header["chunk"] + envelope.TAG
    ct_end = len(data) - trailer
    chunks = []
    pos = head_end
    while pos < ct_end:
        chunks.append((pos, min(pos + step, ct_end)))
        pos += step
    return {"data": data, "head_end": head_end, "chunks": chunks, "ct_end": ct_end}


def must_fail(site: Site, path: Path, match: str | None = None, passphrase=None) -> str:
    with pytest.raises(InputError) as info:
        site.opener(passphrase).open(path)
    if match:
        assert match in str(info.value), str(info.value)
    site.assert_untouched()
    return str(info.value)


def test_round_trip_is_byte_identical(sites, study, tmp_path):
    uid, files = study
    env = seal_file(tmp_path, sites["site-a"], ["site-b"], files)
    assert len(layout(env)["chunks"]) >= 4
    result = sites["site-b"].opener().open(env)
    assert result.replay is None and result.peer == "site-a"
    assert len(result.records) == 3
    for rec, src in zip(result.records, files):
        out = Path(rec["path"])
        assert out.read_bytes() == src.read_bytes()
        assert rec["StudyInstanceUID"] == uid
        assert out == sites["site-b"].home / "archive" / uid / rec["SeriesInstanceUID"] / (rec["SOPInstanceUID"] + ".dcm")
        assert rec["envelope_id"] == env.stem and rec["peer"] == "site-a"
        assert rec["size"] == src.stat().st_size
        import hashlib
        assert rec["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert not list((sites["site-b"].home / "spool").glob(STAGING_PREFIX + "*"))


def test_empty_file_and_exact_chunk_multiple(sites, tmp_path):
    # A plaintext that ends exactly on a chunk boundary must still end with a last-flagged chunk.
    f = make_dicom(tmp_path / "x.dcm", pixels=100)
    entry = entries_for([f])[0]
    framing = envelope.ENTRY_LEN.size + len(entry.to_json()) + 32 + envelope.ENTRY_LEN.size
    chunk = framing + entry.size  # exactly one full chunk
    env = seal_file(tmp_path, sites["site-a"], ["site-b"], [f], chunk=max(chunk, envelope.MIN_CHUNK))
    rec = sites["site-b"].opener().open(env).records[0]
    assert Path(rec["path"]).read_bytes() == f.read_bytes()


def test_flipped_byte_in_every_region_is_detected(sites, study, tmp_path):
    _uid, files = study
    env = seal_file(tmp_path, sites["site-a"], ["site-b"], files)
    lay = layout(env)
    data = lay["data"]
    positions = list(range(12))  # every prelude byte
    positions += [12, 13, (12 + lay["head_end"]) // 2, lay["head_end"] - 2, lay["head_end"] - 1]
    for start, end in lay["chunks"]:
        positions += [start, (start + end) // 2, end - envelope.TAG - 1, end - envelope.TAG, end - 1]
    positions += [lay["ct_end"], len(data) - 1]
    bad = tmp_path / "bad.dtenv"
    for pos in positions:
        for bit in (0x01, 0x80):
            flipped = bytearray(data)
            flipped[pos] ^= bit
            bad.write_bytes(flipped)
            must_fail(sites["site-b"], bad)


def test_truncation_at_every_chunk_boundary_is_detected(sites, study, tmp_path):
    _uid, files = study
    env = seal_file(tmp_path, sites["site-a"], ["site-b"], files)
    lay = layout(env)
    data = lay["data"]
    cuts = [0, 5, 12, lay["head_end"] - 1, lay["head_end"]]
    cuts += [end for _start, end in lay["chunks"]]  # after each chunk, trailer lost
    cuts += [end - 1 for _start, end in lay["chunks"]]
    cuts += [len(data) - 1, len(data) - envelope.SIG_LEN]
    bad = tmp_path / "bad.dtenv"
    for cut in cuts:
        bad.write_bytes(data[:cut])
        must_fail(sites["site-b"], bad)
    # Whole chunks dropped at the end, but the trailer kept: the last-chunk flag catches it.
    trailer = data[lay["ct_end"]:]
    for k in range(1, len(lay["chunks"])):
        bad.write_bytes(data[: lay["chunks"][k][0]] + trailer)
        must_fail(sites["site-b"], bad, "fails authentication")
    # Appended data.
    bad.write_bytes(data + b"\0")
    must_fail(sites["site-b"], bad)


def test_reordered_chunks_are_detected(sites, study, tmp_path):
    _uid, files = study
    env = seal_file(tmp_path, sites["site-a"], ["site-b"], files)
    lay = layout(env)
    data = lay["data"]
    (s0, e0), (s1, e1) = lay["chunks"][0], lay["chunks"][1]
    swapped = data[:s0] + data[s1:e1] + data[s0:e0] + data[e1:]
    bad = tmp_path / "bad.dtenv"
    bad.write_bytes(swapped)
    must_fail(sites["site-b"], bad, "chunk 1 of")


def test_swapped_header_is_detected(sites, study, tmp_path):
    _uid, files = study
    one = layout(seal_file(tmp_path, sites["site-a"], ["site-b"], files))
    two = layout(seal_file(tmp_path, sites["site-a"], ["site-b"], files))
    bad = tmp_path / "bad.dtenv"
    bad.write_bytes(two["data"][: two["head_end"]] + one["data"][one["head_end"]:])
    must_fail(sites["site-b"], bad)
    # Same header, trailer (signature) taken from another envelope.
    bad.write_bytes(one["data"][: one["ct_end"]] + two["data"][two["ct_end"]:])
    must_fail(sites["site-b"], bad, "does not verify")


def test_wrong_recipient_and_replaced_key(sites, study, tmp_path):
    _uid, files = study
    env = seal_file(tmp_path, sites["site-a"], ["site-b"], files)
    msg = must_fail(sites["site-c"], env, "not sealed for this site")
    assert "site-b" in msg
    # site-b lost its keys and made new ones: the old envelope is no longer for it.
    keys.generate_identity(sites["site-b"].config, "site-b", force=True)
    must_fail(Site(sites["site-b"].home), env, "not sealed for this site")


def test_unknown_sender_is_rejected(sites, study, tmp_path):
    _uid, files = study
    stranger_home = tmp_path / "stranger"
    stranger = keys.generate_identity(Config(stranger_home), "site-z")
    eid = envelope.new_envelope_id()
    env = tmp_path / f"{eid}.dtenv"
    with open(env, "wb") as out:
        envelope.seal(out, eid, entries_for(files), identity=stranger,
                      recipients=[sites["site-b"].identity.public()], chunk=SMALL)
    must_fail(sites["site-b"], env, "not a known peer")


def test_forged_sender_is_rejected(sites, study, tmp_path):
    _uid, files = study
    b = sites["site-b"].identity.public()
    c = sites["site-c"].identity
    # site-c claims to be site-a: its fingerprint does not match site-a's configured keys.
    impostor = Identity("site-a", c.enc_private, c.sign_private)
    eid = envelope.new_envelope_id()
    env = tmp_path / f"{eid}.dtenv"
    with open(env, "wb") as out:
        envelope.seal(out, eid, entries_for(files), identity=impostor, recipients=[b], chunk=SMALL)
    must_fail(sites["site-b"], env, "may be forged")
    # site-c copies a real header of site-a (right fingerprint) but can only sign with its own key.
    genuine = seal_file(tmp_path, sites["site-a"], ["site-b", "site-c"], files)
    lay = layout(genuine)
    import hashlib  # noqa: F401  (digest below uses cryptography, like the format)
    from cryptography.hazmat.primitives import hashes

    h = hashes.Hash(hashes.SHA256())
    h.update(lay["data"][: lay["ct_end"]])
    forged_sig = c.sign(envelope.SIG_CONTEXT + h.finalize())
    bad = tmp_path / "forged.dtenv"
    bad.write_bytes(lay["data"][: lay["ct_end"]] + forged_sig)
    must_fail(sites["site-b"], bad, "signature of sender site-a does not verify")


def test_multiple_recipients_each_open(sites, study, tmp_path):
    _uid, files = study
    env = seal_file(tmp_path, sites["site-a"], ["site-b", "site-c"], files)
    for name in ("site-b", "site-c"):
        recs = sites[name].opener().open(env).records
        assert [Path(r["path"]).read_bytes() for r in recs] == [f.read_bytes() for f in files]
    header = envelope.read_header(open(env, "rb"))
    assert header.recipient_names == ["site-b", "site-c"]


def test_replay_writes_nothing_new(sites, study, tmp_path):
    _uid, files = study
    env = seal_file(tmp_path, sites["site-a"], ["site-b"], files)
    first = sites["site-b"].opener().open(env)
    assert first.replay is None
    sites["site-b"].opener().remember(first.envelope_id, first.peer, first.sha256, len(first.records))
    stamps = {p: p.stat().st_mtime_ns for p in sites["site-b"].archive_files()}
    second = sites["site-b"].opener().open(env)
    assert second.replay is not None and second.records == []
    assert {p: p.stat().st_mtime_ns for p in sites["site-b"].archive_files()} == stamps
    # A damaged copy with the same id is not a replay: it is reported.
    copy = tmp_path / "copy.dtenv"
    data = bytearray(env.read_bytes())
    data[-3] ^= 4
    copy.write_bytes(data)
    with pytest.raises(InputError, match="this copy differs"):
        sites["site-b"].opener().open(copy)
    assert {p: p.stat().st_mtime_ns for p in sites["site-b"].archive_files()} == stamps


def test_reopen_without_ledger_keeps_identical_files(sites, study, tmp_path):
    # A crash after the files were renamed but before the ledger entry: opening again
    # rewrites nothing and emits the records again.
    _uid, files = study
    env = seal_file(tmp_path, sites["site-a"], ["site-b"], files)
    sites["site-b"].opener().open(env)
    stamps = {p: p.stat().st_mtime_ns for p in sites["site-b"].archive_files()}
    again = sites["site-b"].opener().open(env)
    assert len(again.records) == 3
    assert {p: p.stat().st_mtime_ns for p in sites["site-b"].archive_files()} == stamps


def _evil(entry: envelope.Entry, **override) -> envelope.Entry:
    obj = orjson.loads(entry.to_json())
    obj.update(override)
    entry.to_json = lambda: orjson.dumps(obj)  # type: ignore[method-assign]
    return entry


@pytest.mark.parametrize("override,match", [
    ({"name": "../../../evil.dcm"}, "unsafe name"),
    ({"name": "/etc/evil.dcm"}, "unsafe name"),
    ({"type": "symlink", "target": "/etc/passwd"}, "links are not accepted"),
    ({"name": "1.2/3.4/5.6.dcm"}, "does not match its UIDs"),
    ({"SOPInstanceUID": "../x"}, "not a valid DICOM UID"),
])
def test_hostile_payload_names_are_rejected(sites, study, tmp_path, override, match):
    _uid, files = study
    good = entries_for(files)
    entries = [good[0], _evil(good[1], **override), good[2]]
    env = seal_file(tmp_path, sites["site-a"], ["site-b"], files, entries=entries)
    must_fail(sites["site-b"], env, match)
    assert not (tmp_path / "evil.dcm").exists()


def test_duplicate_entries_are_rejected(sites, study, tmp_path):
    _uid, files = study
    e = entries_for(files)
    env = seal_file(tmp_path, sites["site-a"], ["site-b"], files, entries=[e[0], e[1], entries_for(files[:1])[0]])
    must_fail(sites["site-b"], env, "twice")


def test_symlink_in_archive_is_not_followed(sites, study, tmp_path):
    uid, files = study
    env = seal_file(tmp_path, sites["site-a"], ["site-b"], files)
    outside = tmp_path / "outside"
    outside.mkdir()
    archive = sites["site-b"].home / "archive"
    archive.mkdir(exist_ok=True)
    (archive / uid).symlink_to(outside)
    with pytest.raises(InputError, match="link"):
        sites["site-b"].opener().open(env)
    assert list(outside.iterdir()) == []
    assert not list((sites["site-b"].home / "spool").glob(STAGING_PREFIX + "*"))


def test_passphrase_mode(sites, study, tmp_path):
    _uid, files = study
    eid = envelope.new_envelope_id()
    env = tmp_path / f"{eid}.dtenv"
    with open(env, "wb") as out:
        envelope.seal(out, eid, entries_for(files), sender="site-a", recipient_names=["site-b"],
                      passphrase=b"correct horse battery staple", chunk=SMALL)
    head = envelope.read_header(open(env, "rb"))
    assert head.mode == "passphrase" and head.kdf["alg"] == "argon2id" and len(head.kdf["salt"]) >= 24
    must_fail(sites["site-b"], env, "give --passphrase-file")
    must_fail(sites["site-b"], env, "passphrase differs", passphrase=b"wrong")
    lay = layout(env)
    bad = tmp_path / "bad.dtenv"
    flipped = bytearray(lay["data"])
    flipped[-1] ^= 1
    bad.write_bytes(flipped)
    must_fail(sites["site-b"], bad, "MAC does not verify", passphrase=b"correct horse battery staple")
    recs = sites["site-b"].opener(b"correct horse battery staple").open(env).records
    assert [Path(r["path"]).read_bytes() for r in recs] == [f.read_bytes() for f in files]
    assert {r["peer"] for r in recs} == {"site-a"}
    # A random salt per envelope: the same passphrase gives different keys.
    eid2 = envelope.new_envelope_id()
    with open(tmp_path / "two.dtenv", "wb") as out:
        envelope.seal(out, eid2, entries_for(files), sender="site-a", recipient_names=["site-b"],
                      passphrase=b"correct horse battery staple", chunk=SMALL)
    head2 = envelope.read_header(open(tmp_path / "two.dtenv", "rb"))
    assert head2.kdf["salt"] != head.kdf["salt"]


def test_no_patient_data_in_clear(sites, tmp_path):
    f = make_dicom(tmp_path / "p.dcm", patient="DOE^JANE", pixels=64)
    env = seal_file(tmp_path, sites["site-a"], ["site-b"], [f])
    data = env.read_bytes()
    for secret in (b"DOE^JANE", b"SYN0001", b"20240101"):
        assert secret not in data
    uids = entries_for([f])[0]
    assert uids.StudyInstanceUID.encode() not in data  # not even the UIDs
    head = envelope.read_header(open(env, "rb"))
    assert set(orjson.loads(head.raw[12:])) == {"v", "id", "mode", "aead", "chunk", "from", "from_fp", "to"}


def test_not_an_envelope(sites, tmp_path):
    junk = tmp_path / "junk.dtenv"
    junk.write_bytes(os.urandom(1000))
    must_fail(sites["site-b"], junk, "not a dtools envelope")
    future = tmp_path / "future.dtenv"
    future.write_bytes(envelope.PRELUDE.pack(envelope.MAGIC, 9, 0, 2) + b"{}")
    must_fail(sites["site-b"], future, "upgrade dtools")


def test_wrong_file_digest_from_a_real_peer_is_rejected(sites, study, tmp_path, monkeypatch):
    # A sender (or a bug) that signs a payload whose digests do not match its files.
    _uid, files = study
    real_call = pipeline.Stage.call
    monkeypatch.setattr(pipeline.Stage, "call", lambda self, fn: (real_call(self, fn), bytes(32))[1])
    env = seal_file(tmp_path, sites["site-a"], ["site-b"], files)
    monkeypatch.undo()
    must_fail(sites["site-b"], env, "does not match (damaged or forged payload)")


@pytest.mark.parametrize("delta,match", [(+10, "shorter"), (-10, "grew")])
def test_file_changing_while_sealing_fails_the_envelope(sites, study, tmp_path, delta, match):
    _uid, files = study
    entries = entries_for(files)
    entries[1].size += delta
    with pytest.raises(InputError, match=match):
        seal_file(tmp_path, sites["site-a"], ["site-b"], files, entries=entries)


def test_every_staged_file_is_fsynced_before_anything_is_renamed(sites, study, tmp_path, monkeypatch):
    # The durability contract: the fsyncs run on their own thread, but every file must be on
    # disk before the first rename into the archive.
    _uid, files = study
    env = seal_file(tmp_path, sites["site-a"], ["site-b"], files)
    synced: set[tuple[int, int]] = set()
    renamed: list[bool] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        real_fsync(fd)
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))

    def replace(src, dst):
        st = os.stat(src)
        renamed.append((st.st_dev, st.st_ino) in synced and len(synced) >= len(files))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    result = sites["site-b"].opener().open(env)
    assert len(result.records) == len(files)
    assert renamed == [True] * len(files)


def test_failed_fsync_of_a_staged_file_writes_nothing(sites, study, tmp_path, monkeypatch):
    _uid, files = study
    env = seal_file(tmp_path, sites["site-a"], ["site-b"], files)
    real_fsync = os.fsync
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match="Input/output error"):
        sites["site-b"].opener().open(env)
    monkeypatch.undo()
    sites["site-b"].assert_untouched()
    assert sites["site-b"].opener().replay(env.stem) is None


def test_early_writeback_while_sealing_and_opening_keeps_bytes_identical(sites, study, tmp_path, monkeypatch):
    # Big files get fdatasync calls while they are still being written; with a tiny interval
    # that happens many times here, on both sides, and must not change a byte.
    uid, files = study
    monkeypatch.setattr(pipeline, "FLUSH_EVERY", SMALL // 2)
    calls: list[int] = []
    real = pipeline.early_writeback
    monkeypatch.setattr(pipeline, "early_writeback", lambda fd: (calls.append(fd), real(fd)))
    eid = envelope.new_envelope_id()
    target = tmp_path / "outbox" / f"{eid}.dtenv"
    with AtomicFile(target, 0o600) as out:
        envelope.seal(out, eid, entries_for(files), identity=sites["site-a"].identity,
                      recipients=[sites["site-a"].peers["site-b"]], chunk=SMALL)
    sealed_calls = len(calls)
    assert sealed_calls >= 1
    result = sites["site-b"].opener().open(target)
    assert len(calls) > sealed_calls
    assert [Path(r["path"]).read_bytes() for r in result.records] == [f.read_bytes() for f in files]


def test_message_entries_travel_beside_files_and_stay_out_of_the_archive(sites, study, tmp_path):
    _uid, files = study
    body = b'{"kind":"catalog","rows":[]}'
    entries = entries_for(files[:1]) + [envelope.Entry.message("catalog", body)]
    env = seal_file(tmp_path, sites["site-a"], ["site-b"], files, entries=entries)
    result = sites["site-b"].opener().open(env)
    assert result.messages == [("catalog", body)]
    assert [Path(r["path"]).read_bytes() for r in result.records] == [files[0].read_bytes()]
    assert len(sites["site-b"].archive_files()) == 1


@pytest.mark.parametrize("entry", [
    {"type": "message", "kind": "Catalog", "name": "message.json", "size": 2},
    {"type": "message", "kind": "catalog", "name": "../x", "size": 2},
    {"type": "message", "kind": "catalog", "name": "message.json", "size": 1 << 40},
])
def test_bad_message_entries_are_refused(entry):
    with pytest.raises(InputError, match="message"):
        envelope.Entry.from_json(orjson.dumps(entry))
