"""Patient data at rest and secrets.

Every file a site writes (archive, index with its -wal and -shm, envelopes in outbox/ and
inbox/, ledgers, spool, the relay Maildir in the home) is readable by its owner only, or
by the group of ``[site] group``, whatever the umask. A secret file others can read, and
TLS checks turned off, are warned about on every run, -q or not. Real commands, real
files, DCMTK's storescu into dserve, and a real Dovecot for the relay.
"""

from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conftest import cmd_path, require_tool, run
from dcmtk import free_port, run_tool, start_dserve, stop
from dovecot import PASSWORD, USER, Dovecot
from dtools.sample import generate
from mailsites import fake_envelope, lines
from test_seal_support import make_sites

PUBLIC = {"identity.pub", "config.toml"}  # a public key and the test's own config: not patient data


@pytest.fixture
def umask(request):
    old = os.umask(request.param)  # inherited by every command the test starts
    yield request.param
    os.umask(old)


def modes(*roots: Path) -> dict[Path, os.stat_result]:
    out = {}
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            for name in [*dirs, *files]:
                p = Path(dirpath) / name
                out[p] = os.lstat(p)
        out[root] = os.lstat(root)
    return out


def ok(r, what: str):
    assert r.returncode == 0, f"{what}: {r.stderr}"
    return r


def other_group() -> tuple[str, int]:
    """A group this user may give files to, other than its own where possible."""
    if os.geteuid() == 0:
        gids = [g.gr_gid for g in grp.getgrall() if g.gr_gid != 0]
    else:
        gids = [g for g in os.getgroups() if g != os.getegid()] or [os.getegid()]
    return grp.getgrgid(gids[0]).gr_name, gids[0]


def every_writer(tmp_path: Path, group: str | None = None) -> tuple[dict[Path, os.stat_result], dict[str, Path]]:
    """One study through every command that writes patient data; the modes of every path
    seen after each step (files that come and go, such as relay messages, included)."""
    homes = make_sites(tmp_path / "sites")
    a, b = homes["site-a"], homes["site-b"]
    for h in (a, b):
        text = (h / "config.toml").read_text()
        if group:
            text = text.replace("[site]\n", f'[site]\ngroup = "{group}"\n', 1)
        if h == b:  # B deposits into and fetches from the relay Maildir in A's home
            text += f'\n[relay]\nurl = "maildir:{a}/relay"\n'
        (h / "config.toml").write_text(text)
    pacs = tmp_path / "pacs"
    generate(pacs, studies=1, series=1, instances=2)
    seen: dict[Path, os.stat_result] = {}

    def snap():
        seen.update(modes(a, b))

    ok(run("dindex", "--home", str(a), str(pacs)), "dindex")
    found = ok(run("dsearch", "--home", str(a), "--level", "instance"), "dsearch")
    sealed = ok(run("dseal", "--home", str(a), "--to", "site-b", input=found.stdout), "dseal --to")
    ok(run("dmail-send", "--home", str(a), input=sealed.stdout), "dmail-send")
    snap()  # the envelope's message waits in A's relay Maildir
    got = ok(run("dmail-recv", "--home", str(b)), "dmail-recv")
    snap()
    opened = ok(run("dseal", "--home", str(b), "--open", input=got.stdout), "dseal --open")
    indexed = ok(run("dindex", "--home", str(b), input=opened.stdout), "dindex at B")
    ok(run("dmail-send", "--home", str(b), "--receipts", input=indexed.stdout), "dmail-send --receipts")
    snap()
    ok(run("dmail-recv", "--home", str(a)), "dmail-recv of the receipt")
    snap()

    # a C-STORE from DCMTK into dserve: archive and index written by the server
    storescu = require_tool("storescu")
    port = free_port()
    node = b / "pacs-node"
    node.mkdir()
    (node / "config.toml").write_text(f'[site]\nname = "node"\n{"group = " + repr(group) if group else ""}\n')
    server = start_dserve(node, port, "--aet", "DTOOLS")
    try:
        res = run_tool(storescu, "-aec", "DTOOLS", "127.0.0.1", str(port), *map(str, sorted(pacs.rglob("*.dcm"))))
        assert res.returncode == 0, res.stderr
        snap()  # dserve's indexer holds the index open: -wal and -shm exist now
    finally:
        stop(server)
    snap()
    return seen, {"a": a, "b": b, "node": b / "pacs-node"}


def written(seen: dict[Path, os.stat_result], home: Path, pattern: str) -> list[Path]:
    return [p for p in seen if p.is_relative_to(home) and p.match(pattern)]


@pytest.mark.parametrize("umask", [0o000, 0o022], indirect=True)
def test_owner_only_whatever_the_umask(tmp_path, umask):
    seen, h = every_writer(tmp_path)
    # every kind of file was written and looked at
    for home, pattern in [(h["b"], "archive/*/*/*.dcm"), (h["node"], "archive/*/*/*.dcm"),
                          (h["a"], "index.db"), (h["node"], "index.db-wal"), (h["node"], "index.db-shm"),
                          (h["a"], "outbox/*.dtenv"), (h["a"], "outbox/ledger.db"), (h["b"], "inbox/*.dtenv"),
                          (h["a"], "relay/dtools/site-b/new/*"), (h["b"], "outbox/ledger.db")]:
        assert written(seen, home, pattern), f"nothing matched {pattern} under {home}"
    loose = {str(p): oct(stat.S_IMODE(st.st_mode)) for p, st in seen.items()
             if p.name not in PUBLIC and not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077}
    assert loose == {}
    for home in h.values():
        assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_library_writers_are_owner_only_without_the_command_layer(tmp_path):
    """dserve built in-process, or any code using the library, does not rely on the umask
    that the commands set: the writers ask for owner-only modes themselves."""
    from dtools.dicom.archive import AtomicFile, write_atomic
    from dtools.index.db import open_index
    from dtools.net.scp.storage import write_new_file

    old = os.umask(0)
    try:
        with AtomicFile(tmp_path / "a" / "b" / "atomic.dcm") as f:
            f.write(b"x")
        write_atomic(tmp_path / "c" / "w.dcm", b"x")
        write_new_file(str(tmp_path / "d" / "e" / "stored.dcm"), (b"x",), sync=False)
        conn = open_index(tmp_path / "idx" / "index.db")
        try:
            conn.execute("CREATE TABLE t (x)")
            found = modes(tmp_path)
        finally:
            conn.close()
    finally:
        os.umask(old)
    assert (tmp_path / "idx" / "index.db-wal") in found and (tmp_path / "d" / "e") in found
    loose = {str(p): oct(stat.S_IMODE(st.st_mode)) for p, st in found.items() if p != tmp_path and st.st_mode & 0o077}
    assert loose == {}


def test_configured_group_reads_and_nobody_else(tmp_path):
    name, gid = other_group()
    old = os.umask(0o077)  # the group bits come from the policy, not from the umask
    try:
        seen, h = every_writer(tmp_path, group=name)
    finally:
        os.umask(old)
    shared = [*written(seen, h["b"], "archive/*/*/*.dcm"), *written(seen, h["node"], "archive/*/*/*.dcm"),
              *written(seen, h["a"], "index.db"), *written(seen, h["node"], "index.db-wal")]
    assert len(shared) >= 5
    for p in shared:
        st = seen[p]
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, gid), p
    for d in [h["a"], h["b"], h["b"] / "archive", *{p.parent for p in written(seen, h["b"], "archive/*/*/*.dcm")}]:
        st = seen[d]
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o2750, gid), d
    for p, st in seen.items():
        assert not st.st_mode & 0o007 or stat.S_ISLNK(st.st_mode) or p.name in PUBLIC, p
        if p.is_relative_to(h["a"] / "keys") or p.is_relative_to(h["b"] / "keys"):
            assert not st.st_mode & 0o077 or p.name in PUBLIC, p  # private keys stay owner-only


def test_unknown_group_is_a_configuration_error(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[site]\ngroup = "no-such-group-xyz"\n')
    r = run("dindex", "--home", str(home), str(tmp_path))
    assert r.returncode == 2
    assert "[site] group 'no-such-group-xyz': no such group" in r.stderr and "config.toml" in r.stderr


def test_a_loose_existing_home_is_tightened_once(tmp_path):
    home = tmp_path / "home"
    (home / "archive").mkdir(parents=True)
    home.chmod(0o755)
    (home / "archive").chmod(0o775)
    (home / "index.db").touch(mode=0o644)
    (home / "index.db").chmod(0o644)
    pacs = tmp_path / "pacs"
    generate(pacs, studies=1, series=1, instances=1)
    r = run("dindex", "--home", str(home), str(pacs))
    assert r.returncode == 0, r.stderr
    assert f"dindex: {home}: changed mode 0755 to 0700" in r.stderr
    assert f"dindex: {home}/archive: changed mode 0775 to 0700" in r.stderr
    assert f"dindex: {home}/index.db: changed mode 0644 to 0600" in r.stderr
    assert [stat.S_IMODE(p.stat().st_mode) for p in (home, home / "archive", home / "index.db")] == [0o700, 0o700, 0o600]
    again = run("dindex", "--home", str(home), str(pacs))
    assert again.returncode == 0 and "changed mode" not in again.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the home to another user")
def test_a_home_that_cannot_be_tightened_is_warned_about_even_with_q(tmp_path):
    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    home.chmod(0o755)
    os.chown(home, 65534, 65534)
    tmp_path.chmod(0o755)
    # without CAP_FOWNER root may not change the mode of a directory it does not own
    proc = subprocess.run([shutil.which("setpriv") or "/usr/bin/setpriv", "--bounding-set=-fowner,-chown", "--",
                           cmd_path("dsearch"), "--home", str(home), "-q", "--count"],
                          capture_output=True, timeout=60)
    err = proc.stderr.decode()
    assert f"dsearch: warning: {home} holds patient data but is not owner only, and could not be changed" in err
    assert f"run: chmod 700 {home}" in err


# -- secrets -----------------------------------------------------------------------------
def test_passphrase_file_others_can_read_is_warned_about(tmp_path):
    pacs = tmp_path / "pacs"
    generate(pacs, studies=1, series=1, instances=1)
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "config.toml").write_text('[site]\nname = "site-a"\n')
    secret = tmp_path / "pass.txt"
    secret.write_text("correct horse battery staple\n")
    secret.chmod(0o644)
    paths = "".join(f"{p}\n" for p in pacs.rglob("*.dcm"))
    r = run("dseal", "--home", str(home), "-q", "--to", "site-b", "--passphrase-file", str(secret), input=paths)
    assert r.returncode == 0, r.stderr
    assert f"dseal: warning: passphrase file {secret} can be read or changed by other users (mode 0644); " \
           f"run: chmod 600 {secret}" in r.stderr
    secret.chmod(0o600)
    r = run("dseal", "--home", str(home), "-q", "--to", "site-b", "--passphrase-file", str(secret), input=paths)
    assert r.returncode == 0 and r.stderr == "", r.stderr


@pytest.fixture(scope="module")
def dovecot():
    with Dovecot(require_tool("dovecot")) as dc:
        yield dc


def mail_sites(tmp_path: Path, url: str) -> dict[str, Path]:
    from mailsites import make_sites as make_mail_sites

    return make_mail_sites(tmp_path, url)


def test_relay_password_files_others_can_read_are_warned_about(tmp_path, dovecot):
    homes = mail_sites(tmp_path, f"imap://{USER}@127.0.0.1:{dovecot.port}/atrest")
    a, b = homes["site-a"], homes["site-b"]
    pw = b / "relay.pass"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o644)
    cfg = (b / "config.toml").read_text().replace("[relay]\n", '[relay]\npassword_file = "relay.pass"\n')
    (b / "config.toml").write_text(cfg)
    r = run("dmail-recv", "--home", str(b), "-q")
    assert r.returncode == 0, r.stderr
    assert f"dmail-recv: warning: password file {pw} can be read or changed by other users (mode 0644); " \
           f"run: chmod 600 {pw}" in r.stderr
    pw.chmod(0o600)
    r = run("dmail-recv", "--home", str(b), "-q")
    assert r.returncode == 0 and r.stderr == "", r.stderr

    # a peer reached through its own relay account: [peers.NAME] relay_password_file
    peer_pw = a / "peer.pass"
    peer_pw.write_text(PASSWORD + "\n")
    peer_pw.chmod(0o640)
    cfg = (a / "config.toml").read_text().replace(
        "[peers.site-b]\n", f'[peers.site-b]\nrelay = "imap://{USER}@127.0.0.1:{dovecot.port}/atrest"\n'
                            'relay_password_file = "peer.pass"\n')
    (a / "config.toml").write_text(cfg)
    env = fake_envelope(a / "outbox", 100)
    r = run("dmail-send", "--home", str(a), "-q", input=lines([env]), env={"DTOOLS_RELAY_PASSWORD": ""})
    assert r.returncode == 0, r.stderr
    assert f"warning: relay password file {peer_pw} can be read or changed by other users (mode 0640); " \
           f"run: chmod 600 {peer_pw}" in r.stderr
    assert r.records and r.records[0]["status"] == "sent"


def test_tls_checks_off_are_warned_about_on_every_run(tmp_path, dovecot):
    homes = mail_sites(tmp_path, dovecot.ssl_url)
    b = homes["site-b"]
    display = f"imaps://{USER}@127.0.0.1:{dovecot.ssl_port}/dtools"
    for _ in range(2):
        r = run("dmail-recv", "--home", str(b), "-q", "--insecure-skip-verify", env=dovecot.env())
        assert r.returncode == 0, r.stderr
        assert r.stderr.count(f"dmail-recv: warning: TLS certificate checks are OFF for {display} "
                              "(--insecure-skip-verify)") == 1, r.stderr
    r = run("dmail-send", "--home", str(b), "-q", env={**dovecot.env(), "DTOOLS_RELAY_INSECURE": "1"},
            input=lines([fake_envelope(tmp_path / "out", 10, to="site-a", sender="site-b")]))
    assert r.returncode == 0, r.stderr
    assert f"TLS certificate checks are OFF for {display} (DTOOLS_RELAY_INSECURE)" in r.stderr
    cfg = b / "config.toml"
    cfg.write_text(cfg.read_text().replace("[relay]\n", "[relay]\ninsecure = true\n"))
    r = run("dmail-recv", "--home", str(b), "-q", env=dovecot.env())
    assert r.returncode == 0, r.stderr
    assert f"TLS certificate checks are OFF for {display} (relay.insecure in {cfg})" in r.stderr
    # verified (the CA trusted): no warning at all
    cfg.write_text(cfg.read_text().replace("insecure = true\n", ""))
    r = run("dmail-recv", "--home", str(b), "-q", env={**dovecot.env(), "SSL_CERT_FILE": str(dovecot.ca)})
    assert r.returncode == 0 and r.stderr == "", r.stderr
