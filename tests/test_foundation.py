"""The shared layer: records, config precedence, archive writes, the entry wrapper."""

from __future__ import annotations

import io
import os
import stat

import click
import pytest

from dtools import cli, records
from dtools.config import Config
from dtools.dicom.archive import AtomicFile, archive_path, check_relative_name, check_uid
from dtools.errors import InputError, RemoteError


def test_records_roundtrip_and_paths():
    buf = io.BytesIO()
    records.write({"kind": "instance", "PatientName": "Müller^Jürgen", "size": 3}, buf)
    stream = io.BytesIO(buf.getvalue() + b"/data/a file.dcm\n\n")
    got = list(records.read(stream))
    assert got[0]["PatientName"] == "Müller^Jürgen"
    assert got[0]["size"] == 3
    assert got[1] == {"path": "/data/a file.dcm"}


def test_records_nul_separated():
    got = list(records.read(io.BytesIO(b"a\nb\0c\0"), null=True))
    assert got == [{"path": "a\nb"}, {"path": "c"}]


def test_records_bad_json_reported():
    bad = []
    got = list(records.read(io.BytesIO(b'{"kind": \n{"path": "x"}\n'), on_error=lambda l, r: bad.append(r)))
    assert got == [{"path": "x"}]
    assert bad and "JSON" in bad[0]


def test_config_precedence(tmp_path, monkeypatch):
    (tmp_path / "config.toml").write_text('[relay]\nurl = "maildir:/from/file"\ntimeout = 5\n')
    monkeypatch.delenv("DTOOLS_RELAY_URL", raising=False)
    cfg = Config(tmp_path)
    assert cfg.get("relay.url") == "maildir:/from/file"
    assert cfg.get("relay.part_timeout", "dflt") == "dflt"
    assert cfg.get("relay.part_timeout") == 86400.0  # the schema's default, "1d"
    monkeypatch.setenv("DTOOLS_RELAY_URL", "maildir:/from/env")
    assert cfg.get("relay.url") == "maildir:/from/env"
    assert cfg.get("relay.url", flag="maildir:/from/flag") == "maildir:/from/flag"
    assert cfg.get("relay.timeout") == 5.0 and cfg.get("relay.timeout", type=int) == 5


def test_config_errors(tmp_path):
    (tmp_path / "config.toml").write_text("[relay\n")
    with pytest.raises(Exception) as exc:
        Config(tmp_path)
    assert "not valid TOML" in str(exc.value)
    with pytest.raises(Exception) as exc:
        Config(tmp_path, tmp_path / "nope.toml")
    assert "not found" in str(exc.value)


def test_secret_from_file_and_env(tmp_path, monkeypatch):
    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "config.toml").write_text('[relay]\npassword_file = "pw"\n')
    monkeypatch.delenv("DTOOLS_RELAY_PASSWORD", raising=False)
    monkeypatch.delenv("DTOOLS_RELAY_PASSWORD_FILE", raising=False)
    cfg = Config(tmp_path)
    assert cfg.secret("relay.password") == "s3cret"
    monkeypatch.setenv("DTOOLS_RELAY_PASSWORD", "fromenv")
    assert cfg.secret("relay.password") == "fromenv"


def test_home_default_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("DTOOLS_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert Config().home == tmp_path / "dtools"


def test_archive_paths_reject_unsafe_names(tmp_path):
    assert archive_path(tmp_path, "1.2", "1.2.3", "1.2.3.4") == tmp_path / "1.2" / "1.2.3" / "1.2.3.4.dcm"
    for bad in ("../1.2", "/etc", "1.2/..", "", "1..2", "x" * 3):
        with pytest.raises(InputError):
            check_uid(bad)
    for bad in ("../x", "/abs", "a/../b", "C:\\x", "a//b"):
        with pytest.raises(InputError):
            check_relative_name(bad)
    assert check_relative_name("a/b.dcm") == "a/b.dcm"


def test_atomic_file_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "d" / "x.dcm"
    with pytest.raises(RuntimeError):
        with AtomicFile(target) as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert not target.exists()
    assert os.listdir(tmp_path / "d") == []
    with AtomicFile(target, 0o600) as f:
        f.write(b"whole")
    assert target.read_bytes() == b"whole"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


# -- the entry wrapper -------------------------------------------------------------
@cli.command("dtest")
@click.option("--mode", default="ok")
def _dtest(app, mode):
    if mode == "ok":
        app.emit({"kind": "instance", "n": 1})
    elif mode == "partial":
        app.emit({"kind": "instance", "n": 1})
        app.fail("/x.dcm", "not a DICOM file")
    elif mode == "remote":
        raise RemoteError("cannot reach imap.example.org:993 (connection refused); check relay.url")
    elif mode == "bug":
        raise ValueError("oops")
    elif mode == "pipe":
        raise BrokenPipeError()
    elif mode == "interrupt":
        raise KeyboardInterrupt()


_main = cli.entry(_dtest)


@pytest.mark.parametrize(
    "mode,code,needle",
    [
        ("ok", 0, ""),
        ("partial", 1, "dtest: /x.dcm: not a DICOM file"),
        ("remote", 69, "dtest: cannot reach imap.example.org:993"),
        ("bug", 70, "dtest: internal error: ValueError: oops (rerun with --debug"),
        ("pipe", 141, ""),
        ("interrupt", 130, "dtest: interrupted"),
    ],
)
def test_entry_exit_codes(invoke, home, mode, code, needle):
    res = invoke(_main, ["--mode", mode])
    assert res.returncode == code
    assert needle in res.stderr
    assert "Traceback" not in res.stderr
    if mode != "pipe":
        assert len([l for l in res.stderr.splitlines() if l.strip()]) <= 1


def test_entry_usage_error_is_one_line(invoke):
    res = invoke(_main, ["--no-such-option"])
    assert res.returncode == 2
    assert res.stderr.startswith("dtest: No such option")
    assert "--no-such-option" in res.stderr and "dtest --help" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_entry_debug_shows_traceback(invoke, home):
    res = invoke(_main, ["--debug", "--mode", "bug"])
    assert res.returncode == 70
    assert "Traceback" in res.stderr


def test_entry_version_and_help(invoke):
    res = invoke(_main, ["--version"])
    assert res.returncode == 0 and b"dtest (dtools)" in res.stdout
    res = invoke(_main, ["-h"])
    assert res.returncode == 0 and b"--home" in res.stdout
