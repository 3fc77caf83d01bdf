"""dseal keygen and dseal peers add write config.toml for the user, keeping the rest of it."""

from __future__ import annotations

import os
import stat
import tomllib

from conftest import run

HAND_WRITTEN = """\
# site B: edited by hand, keep my notes
[site]
name = "site-b"   # our folder on the relay

[relay]
url = "maildir:/srv/relay"   # shared Maildir
timeout = 30

# the PACS
[dserve.destinations]
PACS = "10.0.0.5:104"
"""


def dseal(home, *args):
    return run("dseal", "--home", str(home), *args)


def keygen(home, name):
    r = dseal(home, "keygen", name)
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().strip()


def test_keygen_writes_site_name_into_a_new_config(tmp_path):
    home = tmp_path / "a"
    keygen(home, "site-a")
    assert (home / "config.toml").read_text() == '[site]\nname = "site-a"\n'
    r = dseal(home, "keygen", "--force", "site-a")
    assert r.returncode == 0 and (home / "config.toml").read_text() == '[site]\nname = "site-a"\n'


def test_keygen_keeps_an_existing_file_and_refuses_another_name(tmp_path):
    home = tmp_path / "b"
    home.mkdir()
    text = HAND_WRITTEN.replace('[site]\nname = "site-b"   # our folder on the relay\n\n', "")
    (home / "config.toml").write_text(text)
    os.chmod(home / "config.toml", 0o640)
    keygen(home, "site-b")
    assert (home / "config.toml").read_text() == text + '\n[site]\nname = "site-b"\n'
    assert stat.S_IMODE((home / "config.toml").stat().st_mode) == 0o640

    other = tmp_path / "c"
    other.mkdir()
    (other / "config.toml").write_text(HAND_WRITTEN)
    r = dseal(other, "keygen", "site-x")
    assert r.returncode == 2 and "names this site 'site-b', not 'site-x'" in r.stderr
    assert not (other / "keys").exists() or not any((other / "keys").iterdir())  # nothing half done
    assert (other / "config.toml").read_text() == HAND_WRITTEN


def test_peers_add_keeps_the_file_and_its_comments(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    line_a = keygen(a, "site-a")
    b.mkdir()
    (b / "config.toml").write_text(HAND_WRITTEN)
    os.chmod(b / "config.toml", 0o600)
    line_b = keygen(b, "site-b")
    assert (b / "config.toml").read_text() == HAND_WRITTEN  # [site] name was there already

    r = dseal(b, "peers", "add", "site-a", line_a)
    assert r.returncode == 0, r.stderr
    text = (b / "config.toml").read_text()
    assert text == HAND_WRITTEN + f'\n[peers.site-a]\nidentity = "{line_a}"\n'
    assert stat.S_IMODE((b / "config.toml").stat().st_mode) == 0o600
    assert [p.name for p in b.iterdir() if p.name.startswith(".")] == []  # no temporary left

    # the same peer again: nothing changes, exit 0 (scripts may run it on every deploy)
    r = dseal(b, "peers", "add", "site-a", line_a)
    assert r.returncode == 0 and "nothing changed" in r.stderr
    assert (b / "config.toml").read_text() == text

    # and the peers are usable at once: a sealed envelope opens at the other site
    assert dseal(a, "peers", "add", "site-b", line_b).returncode == 0
    listed = dseal(b, "peers").stdout.decode().split()
    assert "site-a" in listed
    assert tomllib.loads((a / "config.toml").read_text()) == {
        "site": {"name": "site-a"}, "peers": {"site-b": {"identity": line_b}}}


def test_peers_add_refusals(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    line_a, line_b, line_c = keygen(a, "site-a"), keygen(b, "site-b"), keygen(c, "site-c")
    assert dseal(b, "peers", "add", "site-a", line_a).returncode == 0
    before = (b / "config.toml").read_text()

    cases = [
        (["site-a", "dtools1 site-a AAAA BBBB"], "keys must be 32 bytes each"),
        (["site-a", "dtools1 site-a !! ??"], "keys are not valid base64"),
        (["site-a", "hello"], "malformed public identity"),
        (["site-x", line_a], "the identity names the site 'site-a', not 'site-x'"),
        (["site-b", line_b], "this site's own identity"),
        (["../evil", line_a], "peer name '../evil' is not valid"),
        (["site-a", line_c.replace("site-c", "site-a")], "known already with other keys"),
        (["site-c", line_a.replace("site-a", "site-c")], "known already as peer 'site-a'"),
    ]
    for args, message in cases:
        r = dseal(b, "peers", "add", *args)
        assert r.returncode == 2, (args, r.stderr)
        assert message in r.stderr, (args, r.stderr)
        assert len(r.stderr.splitlines()) == 1
        assert (b / "config.toml").read_text() == before

    # a peer known under a local name, and new keys for a known peer, only when asked
    assert dseal(b, "peers", "add", "--rename", "lab", line_c).returncode == 0
    r = dseal(b, "peers", "add", "--force", "site-a", line_c.replace("site-c", "site-a"))
    assert r.returncode == 0, r.stderr
    got = tomllib.loads((b / "config.toml").read_text())["peers"]
    assert got["lab"]["identity"] == line_c
    assert got["site-a"]["identity"].split()[2:] == line_c.split()[2:]


def test_peers_add_refuses_a_config_that_is_wrong_already(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    line_a = keygen(a, "site-a")
    b.mkdir()
    (b / "config.toml").write_text('[relay]\nurll = "x"\n')
    r = dseal(b, "peers", "add", "site-a", line_a)
    assert r.returncode == 2 and "did you mean url?" in r.stderr
    assert (b / "config.toml").read_text() == '[relay]\nurll = "x"\n'


def test_peers_add_follows_a_symlinked_config(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    line_a = keygen(a, "site-a")
    b.mkdir()
    real = tmp_path / "etc-dtools.toml"
    real.write_text('[site]\nname = "site-b"\n')
    (b / "config.toml").symlink_to(real)
    assert dseal(b, "peers", "add", "site-a", line_a).returncode == 0
    assert (b / "config.toml").is_symlink()
    assert "[peers.site-a]" in real.read_text()


def test_peers_grant_writes_the_grants_and_keeps_the_file(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    b.mkdir()
    (b / "config.toml").write_text(HAND_WRITTEN)
    keygen(b, "site-b")
    line_a = keygen(a, "site-a")
    assert dseal(b, "peers", "add", "site-a", line_a).returncode == 0
    before = (b / "config.toml").read_text()

    r = dseal(b, "peers", "grant", "site-a", "share", "retrieve")
    assert r.returncode == 0 and "may now have: share, retrieve" in r.stderr
    text = (b / "config.toml").read_text()
    assert text.startswith(before.split("[peers.site-a]")[0])  # comments and order kept
    peer = tomllib.loads(text)["peers"]["site-a"]
    assert peer["share"] is True and peer["retrieve"] is True and "query" not in peer
    listed = dseal(b, "peers").stdout.decode()
    assert "granted: share, retrieve" in listed

    r = dseal(b, "peers", "grant", "--revoke", "site-a", "share")
    assert r.returncode == 0 and "may now have: retrieve" in r.stderr
    assert tomllib.loads((b / "config.toml").read_text())["peers"]["site-a"]["share"] is False

    kept = (b / "config.toml").read_text()
    for args, says in [(("site-a", "shares"), "unknown grant 'shares'"),
                       (("site-x", "share"), "add it first with 'dseal peers add site-x")]:
        r = dseal(b, "peers", "grant", *args)
        assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert (b / "config.toml").read_text() == kept
