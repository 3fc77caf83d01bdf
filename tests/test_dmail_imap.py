"""dmail-send and dmail-recv against a real Dovecot on 127.0.0.1: TLS, login, limits, failures."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import cmd_path, require_tool, run
from dovecot import PASSWORD, USER, Dovecot
from mailsites import mark_opened, fake_envelope, lines, make_sites

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dovecot():
    with Dovecot(require_tool("dovecot")) as dc:
        yield dc


@pytest.fixture
def folder_name(request):
    # Each test gets its own base folder on the shared server.
    return "t" + str(abs(hash(request.node.name)) % 10**8)


@pytest.fixture
def sites(tmp_path, dovecot, folder_name):
    return make_sites(tmp_path, f"imap://{USER}@127.0.0.1:{dovecot.port}/{folder_name}")


def env_for(dovecot, **extra):
    return {**dovecot.env(), **extra}


def send(dovecot, home, records, *args, env=None):
    return run("dmail-send", "--home", str(home), *args, input=lines(records), env=env or dovecot.env())


def recv(dovecot, home, *args, env=None):
    return run("dmail-recv", "--home", str(home), *args, env=env or dovecot.env())


def server_files(dovecot, folder):
    return dovecot.message_files(folder)


def test_round_trip_with_receipt(dovecot, sites, folder_name):
    a, b = sites["site-a"], sites["site-b"]
    envs = [fake_envelope(a / "outbox", n) for n in (10, 300_000)]
    r = send(dovecot, a, envs, "--max-message-size", "100K")
    assert r.returncode == 0, r.stderr
    assert [m["status"] for m in r.records] == ["sent", "sent"]
    n = len(server_files(dovecot, f"{folder_name}/site-b"))
    assert n == sum(m["parts"] for m in r.records) and n > 2
    # The server stored standard messages with our headers and no patient data in them.
    sample = server_files(dovecot, f"{folder_name}/site-b")[0].read_bytes()
    assert b"X-Dtools-Envelope: " in sample and b"application/octet-stream" in sample
    assert send(dovecot, a, envs, "--max-message-size", "100K").records[0]["status"] == "already-sent"
    r = recv(dovecot, b)
    assert r.returncode == 0, r.stderr
    got = {e["envelope_id"]: e for e in r.records}
    for e in envs:
        assert Path(got[e["envelope_id"]]["path"]).read_bytes() == Path(e["path"]).read_bytes()
    assert server_files(dovecot, f"{folder_name}/site-b") == []
    inst = [{"kind": "instance", "envelope_id": e["envelope_id"], "peer": "site-a"} for e in envs]
    r = send(dovecot, b, inst, "--receipts")
    assert r.returncode == 0, r.stderr
    r = recv(dovecot, a)
    assert r.returncode == 0, r.stderr
    assert sorted((x["envelope_id"], x["status"]) for x in r.records) == sorted((e["envelope_id"], "delivered") for e in envs)


def test_unreachable_server_exits_69_naming_the_host(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nobody listens
    homes = make_sites(tmp_path, f"imap://u@127.0.0.1:{port}/dtools")
    env = fake_envelope(tmp_path, 100)
    r = run("dmail-send", "--home", str(homes["site-a"]), input=lines([env]), env={"DTOOLS_RELAY_PASSWORD": "x"})
    assert r.returncode == 69
    assert f"127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    r = run("dmail-recv", "--home", str(homes["site-b"]), env={"DTOOLS_RELAY_PASSWORD": "x"})
    assert r.returncode == 69 and f"127.0.0.1:{port}" in r.stderr


def test_refused_login_exits_2_naming_the_setting(dovecot, sites):
    r = recv(dovecot, sites["site-b"], env={"DTOOLS_RELAY_PASSWORD": "wrong"})
    assert r.returncode == 2
    assert "refused login" in r.stderr and "relay.password_file" in r.stderr


def test_password_from_file(dovecot, sites, folder_name):
    b = sites["site-b"]
    (b / "relay.pass").write_text(PASSWORD + "\n")
    with open(b / "config.toml", "a") as f:
        f.write("")
    cfg = (b / "config.toml").read_text().replace("[relay]\n", '[relay]\npassword_file = "relay.pass"\n')
    (b / "config.toml").write_text(cfg)
    r = run("dmail-recv", "--home", str(b), env={"DTOOLS_RELAY_PASSWORD": ""})
    assert r.returncode == 0, r.stderr


def test_tls_verified_by_default(dovecot, tmp_path):
    homes = make_sites(tmp_path, dovecot.ssl_url)
    b = homes["site-b"]
    r = recv(dovecot, b)
    assert r.returncode == 69
    assert "not trusted" in r.stderr and "--insecure-skip-verify" in r.stderr
    r = recv(dovecot, b, "--insecure-skip-verify")
    assert r.returncode == 0, r.stderr
    # With the CA trusted, verification succeeds without the insecure flag.
    r = recv(dovecot, b, env=env_for(dovecot, SSL_CERT_FILE=str(dovecot.ca)))
    assert r.returncode == 0, r.stderr
    a = homes["site-a"]
    e = fake_envelope(tmp_path, 5000)
    assert send(dovecot, a, [e], env=env_for(dovecot, SSL_CERT_FILE=str(dovecot.ca))).returncode == 0
    r = recv(dovecot, b, env=env_for(dovecot, SSL_CERT_FILE=str(dovecot.ca)))
    assert [x["envelope_id"] for x in r.records] == [e["envelope_id"]]


def test_appendlimit_lowers_the_message_size(tmp_path):
    limit = 200_000
    with Dovecot(require_tool("dovecot"), append_limit=limit) as dc:
        homes = make_sites(tmp_path, dc.url)
        e = fake_envelope(tmp_path, 700_000)
        r = run("dmail-send", "--home", str(homes["site-a"]), input=lines([e]), env=dc.env())
        assert r.returncode == 0, r.stderr
        files = dc.message_files("dtools/site-b")
        assert len(files) == r.records[0]["parts"] >= 4
        assert max(p.stat().st_size for p in files) <= limit
        r = run("dmail-recv", "--home", str(homes["site-b"]), env=dc.env())
        assert Path(r.records[0]["path"]).read_bytes() == Path(e["path"]).read_bytes()


class DroppingProxy:
    """Forwards to the server and cuts the connection after ``up`` bytes client->server
    or ``down`` bytes server->client."""

    def __init__(self, port: int, up: int = 1 << 62, down: int = 1 << 62):
        self.upstream = port
        self.limits = {"up": up, "down": down}
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(30)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            client, _ = self.sock.accept()
        except OSError:
            return
        server = socket.create_connection(("127.0.0.1", self.upstream))
        done = threading.Event()

        def pump(src, dst, limit):
            moved = 0
            try:
                while moved < limit:
                    data = src.recv(65536)
                    if not data:
                        break
                    data = data[: limit - moved]
                    dst.sendall(data)
                    moved += len(data)
            except OSError:
                pass
            done.set()

        threading.Thread(target=pump, args=(server, client, self.limits["down"]), daemon=True).start()
        threading.Thread(target=pump, args=(client, server, self.limits["up"]), daemon=True).start()
        done.wait(60)
        for s in (client, server):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.sock.close()
        self.thread.join(timeout=10)


def test_dropped_connection_exits_75_and_rerun_completes(dovecot, sites, folder_name):
    a, b = sites["site-a"], sites["site-b"]
    e = fake_envelope(a / "outbox", 600_000)
    proxy = DroppingProxy(dovecot.port, up=400_000)
    try:
        r = send(dovecot, a, [e], "--max-message-size", "100K", "--relay",
                 f"imap://{USER}@127.0.0.1:{proxy.port}/{folder_name}")
    finally:
        proxy.close()
    assert r.returncode == 75, r.stderr
    assert "lost" in r.stderr and "again" in r.stderr
    partial = len(server_files(dovecot, f"{folder_name}/site-b"))
    r = send(dovecot, a, [e], "--max-message-size", "100K")
    assert r.returncode == 0, r.stderr
    assert r.records[0]["appended"] == r.records[0]["parts"] - partial
    assert len(server_files(dovecot, f"{folder_name}/site-b")) == r.records[0]["parts"]
    # The receiver, cut midway too, finishes on its next run.
    proxy = DroppingProxy(dovecot.port, down=300_000)
    try:
        r = recv(dovecot, b, "--relay", f"imap://{USER}@127.0.0.1:{proxy.port}/{folder_name}")
    finally:
        proxy.close()
    assert r.returncode == 75, r.stderr
    assert r.records == []
    assert list((b / "spool").glob("*/*.part"))  # what it got is kept
    r = recv(dovecot, b)
    assert r.returncode == 0, r.stderr
    assert [x["envelope_id"] for x in r.records] == [e["envelope_id"]]
    assert Path(r.records[0]["path"]).read_bytes() == Path(e["path"]).read_bytes()


def test_uidvalidity_change_is_handled(dovecot, sites, folder_name):
    from imapclient import IMAPClient

    a, b = sites["site-a"], sites["site-b"]
    e = fake_envelope(a / "outbox", 250_000)
    send(dovecot, a, [e], "--max-message-size", "100K")
    box = f"{folder_name}/site-b"
    c = IMAPClient("127.0.0.1", dovecot.port, ssl=False)
    c.login(USER, PASSWORD)
    try:
        # Take one part away so the first run only spools part of the set.
        info = c.select_folder(box)
        old_validity = info[b"UIDVALIDITY"]
        uids = c.search("ALL")
        c.create_folder(f"{folder_name}/hold")
        c.move(uids[:1], f"{folder_name}/hold")
        r = recv(dovecot, b)
        assert r.returncode == 0 and r.records == []
        assert len(list((b / "spool").glob("*/*.part"))) == len(uids) - 1
        # Recreate the folder: every message gets a new UID under a new UIDVALIDITY.
        c.unselect_folder()
        c.rename_folder(box, f"{folder_name}/old")
        c.create_folder(box)
        c.select_folder(f"{folder_name}/old")
        c.copy(c.search("ALL"), box)
        c.select_folder(f"{folder_name}/hold")
        c.move(c.search("ALL"), box)
        new_validity = c.select_folder(box)[b"UIDVALIDITY"]
        assert new_validity != old_validity
    finally:
        c.logout()
    r = recv(dovecot, b, "-v")
    assert r.returncode == 0, r.stderr
    assert "UIDVALIDITY" in r.stderr
    assert [x["envelope_id"] for x in r.records] == [e["envelope_id"]]
    assert Path(r.records[0]["path"]).read_bytes() == Path(e["path"]).read_bytes()
    mark_opened(b, e["envelope_id"])
    assert recv(dovecot, b).records == []


def test_idle_streams_records_as_mail_arrives(dovecot, sites):
    a, b = sites["site-a"], sites["site-b"]
    proc = subprocess.Popen([cmd_path("dmail-recv"), "--home", str(b), "--idle", "--max-time", "40s",
                             "--idle-timeout", "20s"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **dovecot.env()})
    try:
        time.sleep(1.0)
        e = fake_envelope(a / "outbox", 20_000)
        t0 = time.monotonic()
        assert send(dovecot, a, [e]).returncode == 0
        line = proc.stdout.readline()  # bounded by --max-time
        assert line, proc.stderr.read().decode()
        assert e["envelope_id"].encode() in line
        assert time.monotonic() - t0 < 15  # well before the idle renewal: IDLE woke it
        proc.terminate()
        assert proc.wait(timeout=20) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_starttls_is_required_and_verified_off_loopback(dovecot, tmp_path, monkeypatch):
    """imap:// to a host that is not loopback upgrades with STARTTLS and verifies the certificate.

    The server listens on 127.0.0.1 only, so the address is made to look remote."""
    import ssl

    from dtools.errors import RemoteError
    from dtools.mail import message as msg
    from dtools.mail.imap import ImapMailbox
    from dtools.mail.relay import RelayURL, parse_url

    monkeypatch.setattr(RelayURL, "loopback", property(lambda self: False))
    url = parse_url(dovecot.url)
    with pytest.raises(RemoteError, match="not trusted"):
        ImapMailbox(url, PASSWORD)
    monkeypatch.setenv("SSL_CERT_FILE", str(dovecot.ca))
    box = ImapMailbox(url, PASSWORD)
    try:
        assert isinstance(box.client._imap.sock, ssl.SSLSocket)
        raw = msg.build(msg.KIND_ENVELOPE, "abcdef0123", "site-a", "site-b", b"x" * 1000, envelope_sha256="1" * 64)
        box.append("starttls/site-b", raw)
        box.select("starttls/site-b")
        [(uid, _size, head)] = box.list_messages()
        assert box.fetch(uid) == bytes(raw)
    finally:
        box.close()
