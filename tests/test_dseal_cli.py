"""dseal as users run it: installed console script, real pipes, two site homes."""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import time
from pathlib import Path

import orjson
import pytest
from conftest import cmd_path, run
from test_seal_support import make_dicom, make_sites, make_study

from dtools.seal.opening import STAGING_PREFIX


def dseal(home: Path, *args: str, input: bytes | str | None = None):
    return run("dseal", "--home", str(home), *args, input=input)


@pytest.fixture
def sites(tmp_path):
    return make_sites(tmp_path / "sites")


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[bytes, bytes]:
    """communicate(), but a hung process dumps its threads' stacks (faulthandler) into the failure."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _out, err = proc.communicate(timeout=30)
        pytest.fail(f"process hung after the signal; its stacks:\n{err.decode(errors='replace')[-8000:]}")


FAULT_ENV = dict(os.environ, PYTHONFAULTHANDLER="1")


def archive_files(home: Path) -> list[Path]:
    root = home / "archive"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_keygen_prints_public_line_and_protects_keys(tmp_path):
    home = tmp_path / "h"
    r = dseal(home, "keygen", "site-x")
    assert r.returncode == 0, r.stderr
    line = r.stdout.decode().strip()
    assert line.startswith("dtools1 site-x ") and len(line.split()) == 4
    for name in ("x25519.key", "ed25519.key"):
        p = home / "keys" / name
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert b"PRIVATE KEY" in p.read_bytes()
        assert p.read_bytes().decode() not in r.stdout.decode() + r.stderr
    again = dseal(home, "keygen", "site-x")
    assert again.returncode == 2 and "--force" in again.stderr
    assert dseal(home, "keygen", "bad/name").returncode == 2
    forced = dseal(home, "keygen", "--force", "site-x")
    assert forced.returncode == 0 and forced.stdout != r.stdout


def test_peers_lists_fingerprints(sites):
    r = dseal(sites["site-b"], "peers")
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.decode().splitlines()]
    assert [row[0] for row in rows] == ["site-b", "site-a"]
    assert all(len(row[1]) == 32 for row in rows)
    pub = dseal(sites["site-a"], "peers").stdout.decode().splitlines()[0].split()
    assert pub[1] == rows[1][1]  # site-b sees site-a's own fingerprint


def test_round_trip_through_pipes(sites, tmp_path):
    uid, files = make_study(tmp_path / "src", n=4, series=2, pixels=3000)
    records = b"".join(orjson.dumps({"kind": "instance", "path": str(f), "SOPInstanceUID": "ignored"}) + b"\n"
                       for f in files)
    sealed = dseal(sites["site-a"], "--to", "site-b", input=records)
    assert sealed.returncode == 0, sealed.stderr
    [env] = sealed.records
    assert env["kind"] == "envelope" and env["from"] == "site-a" and env["to"] == ["site-b"]
    assert env["StudyInstanceUID"] == uid and env["instances"] == 4
    path = Path(env["path"])
    assert path.parent == sites["site-a"] / "outbox" and path.name == env["envelope_id"] + ".dtenv"
    assert env["bytes"] == path.stat().st_size
    assert env["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert not list(path.parent.glob(".*.tmp"))

    opened = dseal(sites["site-b"], "--open", input=sealed.stdout)
    assert opened.returncode == 0, opened.stderr
    recs = opened.records
    assert len(recs) == 4 and {r["kind"] for r in recs} == {"instance"}
    by_sop = {r["SOPInstanceUID"]: r for r in recs}
    for f in files:
        import pydicom

        sop = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        rec = by_sop[sop]
        assert Path(rec["path"]).read_bytes() == f.read_bytes()
        assert rec["envelope_id"] == env["envelope_id"] and rec["peer"] == "site-a"
        assert rec["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()

    # Replay: nothing new, and it says so.
    stamps = {p: p.stat().st_mtime_ns for p in archive_files(sites["site-b"])}
    again = dseal(sites["site-b"], "--open", str(path))
    assert again.returncode == 0 and again.records == []
    assert "already opened" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in archive_files(sites["site-b"])} == stamps


@pytest.mark.parametrize("group,expected", [("study", 2), ("series", 3), ("none", 1)])
def test_grouping(sites, tmp_path, group, expected):
    _u1, one = make_study(tmp_path / "s1", n=3, series=2)
    _u2, two = make_study(tmp_path / "s2", n=2, series=1)
    paths = "\n".join(str(p) for p in one + two) + "\n"
    r = dseal(sites["site-a"], "--to", "site-b", "--group", group, input=paths)
    assert r.returncode == 0, r.stderr
    assert len(r.records) == expected
    assert sum(rec["instances"] for rec in r.records) == 5
    if group == "none":
        assert sorted(r.records[0]["StudyInstanceUID"]) == sorted([_u1, _u2])


def test_bad_inputs_are_named_and_the_rest_sealed(sites, tmp_path):
    _uid, files = make_study(tmp_path / "src", n=2)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all" * 10)
    missing = tmp_path / "missing.dcm"
    stdin = f"{files[0]}\n{junk}\n{missing}\n{{not json\n{files[1]}\n"
    r = dseal(sites["site-a"], "--to", "site-b", input=stdin)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("dseal: ") and not ln.startswith("dseal: sealed ")]
    assert len(lines) == 3, r.stderr
    assert any(str(junk) in ln and "not a DICOM file" in ln for ln in lines)
    assert any(str(missing) in ln for ln in lines)
    assert "Traceback" not in r.stderr
    [env] = r.records
    assert env["instances"] == 2


def test_usage_and_config_errors(sites, tmp_path):
    r = dseal(sites["site-a"], input="")
    assert r.returncode == 2 and "--to PEER" in r.stderr
    r = dseal(sites["site-a"], "--to", "site-b", "--open", input="")
    assert r.returncode == 2
    r = dseal(sites["site-a"], "--to", "nobody", input="")
    assert r.returncode == 2 and "dseal peers add nobody" in r.stderr
    with open(sites["site-a"] / "config.toml", "a") as f:
        f.write('\n[peers.mailonly]\nrelay = "imaps://m@example.org/dtools"\n')
    r = dseal(sites["site-a"], "--to", "mailonly", input="")
    assert r.returncode == 2 and "has no identity" in r.stderr and "--passphrase-file" in r.stderr
    r = dseal(sites["site-a"], "--group", "patient", "--to", "site-b", input="")
    assert r.returncode == 2
    r = dseal(tmp_path / "empty-home", "--to", "site-b", input="")
    assert r.returncode == 2 and "run 'dseal keygen NAME'" in r.stderr
    r = dseal(sites["site-a"], "--to", "site-b", "--passphrase-file", str(tmp_path / "none"), input="")
    assert r.returncode == 2 and "passphrase file" in r.stderr
    for args in (["--help"], ["--version"], ["keygen", "--help"], ["peers", "--help"]):
        assert dseal(sites["site-a"], *args).returncode == 0


def test_bad_envelopes_fail_alone(sites, tmp_path):
    _uid, files = make_study(tmp_path / "src", n=2, pixels=4000)
    good = dseal(sites["site-a"], "--to", "site-b", *map(str, files)).records[0]
    other = make_study(tmp_path / "src2", n=1)[1]
    tampered = Path(dseal(sites["site-a"], "--to", "site-b", *map(str, other)).records[0]["path"])
    data = bytearray(tampered.read_bytes())
    data[len(data) // 2] ^= 0x10
    tampered.write_bytes(data)
    truncated = tmp_path / "trunc.dtenv"
    truncated.write_bytes(Path(good["path"]).read_bytes()[:-100])
    stdin = (str(tampered) + "\n" + orjson.dumps(good).decode() + "\n" + str(truncated) + "\n"
             + str(tmp_path / "nope.dtenv") + "\n")
    r = dseal(sites["site-b"], "--open", input=stdin)
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if "nothing was written" in ln]
    assert len(errors) == 3, r.stderr
    assert {rec["envelope_id"] for rec in r.records} == {good["envelope_id"]}
    assert len(archive_files(sites["site-b"])) == 2
    assert not list((sites["site-b"] / "spool").glob(STAGING_PREFIX + "*"))
    # The envelope of site-a opened by site-a itself: not for it.
    r = dseal(sites["site-a"], "--open", good["path"])
    assert r.returncode == 1 and "not sealed for this site" in r.stderr


def test_passphrase_mode_cli(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("a long shared passphrase\n")
    pw.chmod(0o600)  # a passphrase file others can read gets its own warning (test_at_rest)
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(mode=0o700)
    (a / "config.toml").write_text('[site]\nname = "site-a"\n')
    _uid, files = make_study(tmp_path / "src", n=2)
    sealed = dseal(a, "--to", "site-b", "--passphrase-file", str(pw), *map(str, files))
    assert sealed.returncode == 0, sealed.stderr
    assert "warning" not in sealed.stderr
    short = tmp_path / "short"
    short.write_text("hunter2\n")
    weak = dseal(a, "--to", "site-b", "--passphrase-file", str(short), str(files[0]))
    assert weak.returncode == 0 and "only 7 bytes" in weak.stderr
    env = sealed.records[0]
    assert env["from"] == "site-a"
    r = dseal(b, "--open", env["path"])  # no keys, no passphrase: nothing to open with
    assert r.returncode == 2 and "--passphrase-file" in r.stderr and "dseal keygen" in r.stderr
    assert dseal(b, "keygen", "site-b").returncode == 0
    r = dseal(b, "--open", env["path"])  # keys, but this envelope needs the passphrase
    assert r.returncode == 1 and "give --passphrase-file" in r.stderr
    wrong = tmp_path / "wrong"
    wrong.write_text("another passphrase\n")
    r = dseal(b, "--open", "--passphrase-file", str(wrong), env["path"])
    assert r.returncode == 1 and archive_files(b) == []
    r = dseal(b, "--open", "--passphrase-file", str(pw), env["path"])
    assert r.returncode == 0, r.stderr
    assert sorted(Path(x["path"]).read_bytes() for x in r.records) == sorted(f.read_bytes() for f in files)


def test_no_patient_data_on_stderr_or_in_names(sites, tmp_path):
    f = make_dicom(tmp_path / "src" / "x.dcm", patient="DOE^JANE", pixels=64)
    r = dseal(sites["site-a"], "--to", "site-b", str(f))
    o = dseal(sites["site-b"], "--open", input=r.stdout)
    assert o.returncode == 0
    for text in (r.stderr, o.stderr):
        assert "DOE" not in text and "SYN0001" not in text
    for home in sites.values():
        for p in home.rglob("*"):
            assert "DOE" not in p.name
    env = Path(r.records[0]["path"]).read_bytes()
    assert b"DOE^JANE" not in env


@pytest.mark.slow
def test_killed_open_leaves_archive_clean_and_rerun_finishes(sites, tmp_path):
    # A 96 MB study: opening takes long enough to be killed midway.
    _uid, files = make_study(tmp_path / "src", n=6, pixels=16 << 20)
    env = dseal(sites["site-a"], "--to", "site-b", *map(str, files)).records[0]
    spool = sites["site-b"] / "spool"
    for sig in (signal.SIGKILL, signal.SIGTERM):
        proc = subprocess.Popen([cmd_path("dseal"), "--home", str(sites["site-b"]), "--open", env["path"]],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=FAULT_ENV)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(spool.glob(f"{STAGING_PREFIX}{proc.pid}-*/*.part")):
            time.sleep(0.005)
        proc.send_signal(sig)
        out, err = finish(proc)
        if proc.returncode == 0:
            pytest.skip("open finished before the signal arrived")
        assert archive_files(sites["site-b"]) == []
        assert out == b""
        if sig == signal.SIGTERM:
            assert proc.returncode == 143 and b"terminated" in err
            assert not list(spool.glob(STAGING_PREFIX + "*"))
    r = dseal(sites["site-b"], "--open", env["path"])
    assert r.returncode == 0, r.stderr
    assert len(r.records) == 6
    assert not list(spool.glob(STAGING_PREFIX + "*"))  # the killed run's staging was cleaned
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert sorted(map(digest, archive_files(sites["site-b"]))) == sorted(map(digest, files))


def test_interrupted_seal_leaves_no_envelope(sites, tmp_path):
    uid, files = make_study(tmp_path / "src", n=1)
    unreadable = make_dicom(tmp_path / "src" / "locked.dcm", study=uid)
    # A file that vanishes between the check and the seal: the envelope is not written.
    from dtools.seal import sealing

    groups = sealing.collect([{"path": str(files[0])}, {"path": str(unreadable)}], "study",
                             lambda *a: pytest.fail(str(a)), lambda m: None)
    os.unlink(unreadable)
    from dtools.config import Config
    from dtools.errors import InputError
    from dtools.seal import keys

    cfg = Config(sites["site-a"])
    ident = keys.load_identity(cfg)
    peers = keys.load_peers(cfg)
    for g in groups:
        with pytest.raises(InputError, match="cannot read"):
            sealing.seal_group(g, cfg.dir("outbox"), identity=ident, recipients=[peers["site-b"]], sender="site-a",
                               recipient_names=["site-b"], passphrase=None, advance=lambda n: None)
    assert list((sites["site-a"] / "outbox").iterdir()) == []


def test_nul_separated_paths_and_group_from_environment(sites, tmp_path):
    _uid, files = make_study(tmp_path / "src dir", n=3, series=3)
    stdin = b"\0".join(str(f).encode() for f in files) + b"\0"
    r = run("dseal", "--home", str(sites["site-a"]), "-0", "--to", "site-b", input=stdin,
            env={"DTOOLS_SEAL_GROUP": "series"})
    assert r.returncode == 0, r.stderr
    assert len(r.records) == 3
    r = run("dseal", "--home", str(sites["site-a"]), "-0", "--to", "site-b", "--group", "study", "--resend",
            input=stdin, env={"DTOOLS_SEAL_GROUP": "series"})
    assert len(r.records) == 1  # the flag wins over the environment
    r = run("dseal", "--home", str(sites["site-a"]), "--to", "site-b", input=str(files[0]),
            env={"DTOOLS_SEAL_GROUP": "patient"})
    assert r.returncode == 2 and "DTOOLS_SEAL_GROUP" in r.stderr


def test_sealing_to_several_peers_and_a_given_twice_file(tmp_path):
    homes = make_sites(tmp_path / "sites", ("site-a", "site-b", "site-c"))
    _uid, files = make_study(tmp_path / "src", n=2)
    r = dseal(homes["site-a"], "--to", "site-b", "--to", "site-c", "--to", "site-b",
              str(files[0]), str(files[1]), str(files[0]))
    assert r.returncode == 0, r.stderr
    [env] = r.records
    assert env["to"] == ["site-b", "site-c"] and env["instances"] == 2
    for name in ("site-b", "site-c"):
        o = dseal(homes[name], "--open", input=r.stdout)
        assert o.returncode == 0 and len(o.records) == 2
        assert {x["peer"] for x in o.records} == {"site-a"}


def test_disk_full_while_opening_is_a_temporary_failure(sites, tmp_path, monkeypatch, invoke):
    import errno

    from dtools.commands.dseal import main
    from dtools.seal import opening

    _uid, files = make_study(tmp_path / "src", n=2)
    env = dseal(sites["site-a"], "--to", "site-b", *map(str, files)).records[0]

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(opening.os, "replace", full)
    r = invoke(main, ["--home", str(sites["site-b"]), "--open", env["path"]])
    assert r.returncode == 75 and "run again" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == b""
    assert archive_files(sites["site-b"]) == []
    assert not list((sites["site-b"] / "spool").glob(STAGING_PREFIX + "*"))
    monkeypatch.undo()
    r = dseal(sites["site-b"], "--open", env["path"])
    assert r.returncode == 0 and len(r.records) == 2


def test_record_kinds(sites, tmp_path):
    _uid, files = make_study(tmp_path / "src", n=1)
    study = orjson.dumps({"kind": "study", "StudyInstanceUID": "1.2.3"}).decode()
    r = dseal(sites["site-a"], "--to", "site-b", input=f"{study}\n{files[0]}\n")
    assert r.returncode == 1 and "dsearch --level instance" in r.stderr
    assert len(r.records) == 1
    receipt = orjson.dumps({"kind": "receipt", "envelope_id": "0" * 32, "peer": "site-a"}).decode()
    r2 = dseal(sites["site-b"], "--open", input=r.stdout + receipt.encode() + b"\n")
    assert r2.returncode == 0, r2.stderr
    assert len(r2.records) == 1 and "skipped 1 record" in r2.stderr


@pytest.mark.slow
def test_terminated_or_killed_seal_leaves_no_envelope(sites, tmp_path):
    _uid, files = make_study(tmp_path / "src", n=6, pixels=16 << 20)
    outbox = sites["site-a"] / "outbox"
    outbox.mkdir(exist_ok=True)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen([cmd_path("dseal"), "--home", str(sites["site-a"]), "--to", "site-b",
                                 *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=FAULT_ENV)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(outbox.glob(".*.tmp")):
            time.sleep(0.005)
        proc.send_signal(sig)
        out, err = finish(proc)
        if proc.returncode == 0:
            pytest.skip("seal finished before the signal arrived")
        assert out == b""
        assert not list(outbox.glob("*.dtenv")), "a half-written envelope became visible"
        if sig == signal.SIGTERM:
            assert proc.returncode == 143 and b"terminated" in err
            assert list(outbox.glob("*.dtenv")) == [] and list(outbox.glob(".*.tmp")) == []
    # SIGKILL leaves its temporary; a later run removes it once it is old.
    [stale] = list(outbox.glob(".*.tmp"))
    old = time.time() - 7200
    os.utime(stale, (old, old))
    r = dseal(sites["site-a"], "--to", "site-b", str(files[0]))
    assert r.returncode == 0
    assert not stale.exists()
    assert [p.name for p in outbox.glob("*dtenv*")] == [r.records[0]["envelope_id"] + ".dtenv"]


def test_common_options_may_follow_a_subcommand(tmp_path):
    """'dseal keygen NAME --home DIR', as an admin types it, works like '--home DIR keygen NAME'."""
    a, b = tmp_path / "a", tmp_path / "b"
    line_b = run("dseal", "keygen", "site-b", "--home", str(b), "-q")
    assert line_b.returncode == 0 and line_b.stderr == "", line_b.stderr
    assert run("dseal", "keygen", "site-a", "--home", str(a)).returncode == 0
    added = run("dseal", "peers", "add", "site-b", line_b.stdout.decode().strip(), "--home", str(a))
    assert added.returncode == 0, added.stderr
    granted = run("dseal", "peers", "--home", str(a), "grant", "site-b", "share", "-q")
    assert granted.returncode == 0 and granted.stderr == "", granted.stderr
    listed = run("dseal", "peers", "--home", str(a))
    assert "site-b" in listed.stdout.decode() and "share" in listed.stdout.decode()
    assert (b / "keys" / "ed25519.key").exists() and (a / "keys" / "ed25519.key").exists()
