"""config.toml checked against the one schema: typos, wrong types and stray secrets are errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import run
from dtools import settings
from dtools.config import Config
from dtools.errors import ConfigError

MAN = Path(__file__).resolve().parent.parent / "man"


def _config(home: Path, text: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ('[relay]\nurll = "imaps://a@b/c"\n', "unknown key 'urll' in [relay]; did you mean url?"),
    ('[rely]\nurl = "imaps://a@b/c"\n', "unknown section [rely]; did you mean [relay]?"),
    ('[xyzzy]\n', "unknown section [xyzzy]; known: dserve, dstore, index, peers, relay, retention, seal, site"),
    ('name = "site-a"\n', "unknown key 'name' outside any section; did you mean [site] name?"),
    ('[relay]\naet = "X"\n', "unknown key 'aet' in [relay]; did you mean [dserve] aet?"),
    ('[peers.site-b]\nidentiy = "x"\n', "unknown key 'identiy' in [peers.site-b]; did you mean identity?"),
    ('[dserve]\nport = "abc"\n', "[dserve] port = 'abc' is not valid: expected an integer from 1 to 65535"),
    ('[dserve]\nport = 0\n', "[dserve] port = 0 is not valid: expected an integer from 1 to 65535"),
    ('[index]\njobs = 1.5\n', "[index] jobs = 1.5 is not valid: expected an integer of at least 1"),
    ('[relay]\ninsecure = "maybe"\n', "[relay] insecure = 'maybe' is not valid: expected true or false"),
    ('[relay]\npart_timeout = "3 days"\n', "expected a duration like 90s, 15m, 6h, 7d or 1w"),
    ('[relay]\nmax_message_size = "big"\n', "expected a size like 512K, 20M or 1G"),
    ('[seal]\ngroup = "patient"\n', "[seal] group = 'patient' is not valid: expected one of 'study', 'series', 'none'"),
    ('[site]\nname = "site a"\n', "[site] name = 'site a' is not valid"),
    ('relay = "imaps://a@b/c"\n', "relay must be a table [relay]"),
    ('[relay]\npassword = "hunter2"\n', "[relay] password: secrets are not read from config.toml; put it in a file "
                                        "named by [relay] password_file, or in DTOOLS_RELAY_PASSWORD"),
    ('[peers."../x"]\nidentity = "x"\n', "[peers.../x]: a peer name is letters"),
    ('[dserve.destinations]\nPACS = { hots = "pacs", port = 104 }\n',
     "unknown key 'hots' in [dserve.destinations] PACS; did you mean host?"),
    ('[dserve.destinations]\nPACS = 104\n', "[dserve.destinations] PACS = 104 is not valid"),
])
def test_config_file_errors_name_key_file_and_fix(tmp_path, text, message):
    path = _config(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        Config(tmp_path)
    assert str(exc.value).startswith(f"{path}: ")
    assert message in str(exc.value)
    assert "hunter2" not in str(exc.value)  # a secret never echoes back


def test_valid_config_values_are_converted(tmp_path, monkeypatch):
    for var in ("DTOOLS_DSERVE_PORT", "DTOOLS_RELAY_PART_TIMEOUT", "DTOOLS_RELAY_INSECURE"):
        monkeypatch.delenv(var, raising=False)
    _config(tmp_path, '[relay]\nmax_message_size = "64K"\npart_timeout = "2h"\ninsecure = false\n'
                      '[dserve]\nport = "104"\nallow = "CT01, MR02"\n'
                      '[dserve.destinations]\nPACS = "10.0.0.5:104"\nOTHER = { host = "h", port = 11112 }\n'
                      '[peers.site-b]\nrelay = "imaps://b@mail/dtools"\n')
    cfg = Config(tmp_path)
    assert cfg.get("relay.max_message_size") == 65536
    assert cfg.get("relay.part_timeout") == 7200.0
    assert cfg.get("relay.insecure") is False
    assert cfg.get("dserve.port") == 104
    assert cfg.get("dserve.allow") == ["CT01", "MR02"]
    assert cfg.get("dserve.sync") == "always"  # the schema's default
    monkeypatch.setenv("DTOOLS_DSERVE_PORT", "abc")
    with pytest.raises(ConfigError, match=r"^DTOOLS_DSERVE_PORT: \[dserve\] port = 'abc' is not valid"):
        cfg.get("dserve.port")
    monkeypatch.setenv("DTOOLS_RELAY_INSECURE", "yes")
    assert cfg.get("relay.insecure") is True


def test_reading_a_key_missing_from_the_schema_is_a_bug(tmp_path):
    with pytest.raises(LookupError, match="not in dtools.settings.SCHEMA"):
        Config(tmp_path).get("relay.urll")


def test_schema_defaults_parse_and_keys_are_documented():
    """Each key of the schema has a valid default and an entry in dtools(7)."""
    page = (MAN / "dtools.7").read_text().replace("\\-", "-").replace("\\fI", "").replace("\\fB", "").replace("\\fR", "")
    for key, s in settings.SCHEMA.items():
        if s.default is not None:
            s.kind.parse(s.default)
        section, _, name = key.rpartition(".")
        entry = f"[{section.replace('*', 'NAME')}]" + ("" if name == "*" else f" {name}")
        assert entry in page, f"{entry} is not documented in dtools(7)"


def test_unknown_dtools_variables_warn(tmp_path, monkeypatch):
    monkeypatch.setenv("DTOOLS_RELAY_URLL", "imaps://a@b/c")
    monkeypatch.setenv("DTOOLS_PEERS_SITE_B_RELAY_PASSWORD", "x")  # a per-peer secret: known
    monkeypatch.setenv("DTOOLS_DEMO_DIR", "/x")
    warnings = Config(tmp_path).warnings
    assert warnings == ["environment variable DTOOLS_RELAY_URLL is not a dtools setting and is ignored; "
                        "did you mean DTOOLS_RELAY_URL?"]


# -- through the installed commands ----------------------------------------------------------
def test_typo_in_relay_is_an_error_not_a_silent_maildir(tmp_path):
    """The issue's case: [relay] urll used to fall back to the Maildir relay with exit 0."""
    home = tmp_path / "home"
    path = _config(home, '[site]\nname = "site-a"\n[relay]\nurll = "imaps://a@mail.example.org/dtools"\n')
    r = run("dmail-send", "--home", str(home), input="")
    assert r.returncode == 2, r.stderr
    assert r.stderr == f"dmail-send: {path}: unknown key 'urll' in [relay]; did you mean url?\n"
    assert not (home / "relay").exists()


@pytest.mark.parametrize("cmd, args", [
    ("dsearch", ["--count"]), ("dindex", []), ("dseal", ["--to", "x"]), ("dmail-recv", []),
    ("dserve", ["--port", "1"]), ("dstore", ["PACS@127.0.0.1:1"]),
])
def test_every_command_refuses_a_bad_config(tmp_path, cmd, args):
    home = tmp_path / "home"
    _config(home, '[dserve]\nport = "abc"\n')
    r = run(cmd, "--home", str(home), *args, input="")
    assert r.returncode == 2, (cmd, r.stderr)
    assert "[dserve] port = 'abc' is not valid: expected an integer from 1 to 65535" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1


def test_config_not_utf8_is_a_config_error(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_bytes(b'[site]\nname = "\xff"\n')
    r = run("dsearch", "--home", str(home), "--count")
    assert r.returncode == 2 and "not valid TOML" in r.stderr


def test_unknown_variable_warns_once_per_run(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    assert run("dindex", "--home", str(home), input="").returncode == 0
    r = run("dsearch", "--home", str(home), "--count", env={"DTOOLS_INDEX_PATHH": "x.db"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"0\n"
    assert r.stderr.count("DTOOLS_INDEX_PATHH is not a dtools setting") == 1
    assert "did you mean DTOOLS_INDEX_PATH?" in r.stderr
