"""Site identities and peers: key files, modes, the public line, signatures."""

import stat

import pytest

from dtools.config import Config
from dtools.errors import ConfigError, InputError
from dtools.seal import keys


def test_generate_load_and_modes(home):
    cfg = Config(home)
    ident = keys.generate_identity(cfg, "site-a")
    for name in (keys.ENC_KEY_FILE, keys.SIGN_KEY_FILE):
        assert stat.S_IMODE((home / "keys" / name).stat().st_mode) == 0o600
    assert stat.S_IMODE((home / "keys").stat().st_mode) == 0o700
    again = keys.load_identity(cfg)
    assert again.name == "site-a"
    assert again.public().same_keys(ident.public())
    assert again.public().fingerprint == ident.public().fingerprint
    assert len(ident.public().fingerprint) == 32


def test_refuses_overwrite_unless_forced(home):
    cfg = Config(home)
    first = keys.generate_identity(cfg, "site-a")
    with pytest.raises(ConfigError, match="--force"):
        keys.generate_identity(cfg, "site-a")
    second = keys.generate_identity(cfg, "site-b", force=True)
    assert not second.public().same_keys(first.public())
    assert keys.load_identity(cfg).name == "site-b"


def test_missing_identity_says_what_to_do(home):
    with pytest.raises(ConfigError, match="run 'dseal keygen NAME'"):
        keys.load_identity(Config(home))


def test_public_line_round_trip_and_signature(home):
    ident = keys.generate_identity(Config(home), "site-a")
    line = keys.format_public_identity(ident.public())
    assert line.startswith("dtools1 site-a ") and "\n" not in line
    peer = keys.parse_public_identity(line)
    assert peer.same_keys(ident.public())
    sig = ident.sign(b"data")
    peer.verify(sig, b"data")
    with pytest.raises(InputError):
        peer.verify(sig, b"datb")


@pytest.mark.parametrize("bad", ["", "dtools1 a b", "dtools2 a AAAA BBBB", "dtools1 a !!! ???",
                                 "dtools1 ../x " + "A" * 44 + " " + "A" * 44, "dtools1 a QUJD QUJD"])
def test_malformed_public_line(bad):
    with pytest.raises(ConfigError):
        keys.parse_public_identity(bad)


def test_load_peers(home, tmp_path):
    other = Config(tmp_path / "other")
    ident = keys.generate_identity(other, "site-b")
    line = keys.format_public_identity(ident.public())
    (home / "config.toml").write_text(f'[peers.bee]\nidentity = "{line}"\n')
    peers = keys.load_peers(Config(home))
    assert list(peers) == ["bee"]
    assert peers["bee"].same_keys(ident.public())
    (home / "config.toml").write_text('[peers.bee]\nidentity = "dtools1 nope"\n')
    with pytest.raises(ConfigError, match=r"\[peers.bee\]"):
        keys.load_peers(Config(home))
    # A peer without identity (passphrase only) is left out, not an error.
    (home / "config.toml").write_text(f'[peers.bee]\nidentity = "{line}"\n\n[peers.wasp]\nrelay = "imaps://wasp@example.org/dtools"\n')
    assert list(keys.load_peers(Config(home))) == ["bee"]
