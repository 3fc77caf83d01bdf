"""Unit tests of the relay library: addresses, the MIME part format, ages, the ledger, Maildir."""

from __future__ import annotations

import hashlib
import os

import pytest

from dtools.config import Config
from dtools.errors import ConfigError, InputError, UsageError
from dtools.mail import message as msg
from dtools.mail.common import RunLock, parse_age
from dtools.exchange.ledger import Ledger
from dtools.mail.maildir import MaildirMailbox
from dtools.mail.relay import open_mailbox, parse_url, relay_for
from dtools.errors import TempFailure


def test_parse_imaps_url():
    u = parse_url("imaps://relay%40example.org@mail.example.org/dtools")
    assert (u.scheme, u.user, u.host, u.port, u.base) == ("imaps", "relay@example.org", "mail.example.org", 993, "dtools")
    assert u.folder("site-b") == "dtools/site-b"
    assert not u.loopback
    assert "relay%40example.org@" in u.display


def test_parse_imap_url_default_port_and_base():
    u = parse_url("imap://me@127.0.0.1")
    assert (u.port, u.base, u.loopback) == (143, "dtools", True)


def test_parse_maildir_url(tmp_path):
    u = parse_url(f"maildir:{tmp_path}/relay")
    assert u.scheme == "maildir" and u.path == tmp_path / "relay"
    assert parse_url("maildir:rel", home=tmp_path).path == tmp_path / "rel"


@pytest.mark.parametrize("bad", ["http://x@y/z", "imaps://host/f", "imaps://u:pw@host/f", "maildir:",
                                 "imaps://u@host/../x", "imaps://u@host:notaport/x", "nothing"])
def test_bad_urls_are_usage_errors(bad):
    with pytest.raises(UsageError):
        parse_url(bad)


def test_password_in_url_is_refused_with_hint():
    with pytest.raises(UsageError, match="relay.password_file"):
        parse_url("imaps://u:secret@host/f")


def test_default_relay_is_maildir_in_home(tmp_path, monkeypatch):
    monkeypatch.delenv("DTOOLS_RELAY_URL", raising=False)
    cfg = Config(tmp_path)
    url, key = relay_for(cfg)
    assert url.scheme == "maildir" and url.path == tmp_path / "relay" and key == "relay.password"


def test_peer_may_have_its_own_account(tmp_path, monkeypatch):
    monkeypatch.delenv("DTOOLS_RELAY_URL", raising=False)
    (tmp_path / "config.toml").write_text('[relay]\nurl = "imaps://a@shared/dtools"\n'
                                          '[peers.site-c]\nrelay = "imaps://c@other/dtools"\n')
    cfg = Config(tmp_path)
    assert relay_for(cfg, peer="site-b")[0].host == "shared"
    url, key = relay_for(cfg, peer="site-c")
    assert url.host == "other" and key == "peers.site-c.relay_password"


def test_imap_without_password_names_the_setting(tmp_path, monkeypatch):
    monkeypatch.delenv("DTOOLS_RELAY_PASSWORD", raising=False)
    cfg = Config(tmp_path)
    with pytest.raises(ConfigError, match="relay.password_file"):
        open_mailbox(cfg, parse_url("imaps://u@127.0.0.1:1/x"))


def test_part_size_fits_the_limit():
    for limit in (64 * 1024, 1_000_000, 20 * 1024 * 1024):
        size = msg.part_payload_size(limit)
        data = os.urandom(size)
        built = msg.build(msg.KIND_ENVELOPE, "ab" * 16, "site-a", "site-b", data, part=99999, total=99999,
                          envelope_sha256="0" * 64, envelope_bytes=10**12)
        assert len(built) <= limit
        assert limit - len(built) < 8192  # and does not waste the allowance


def test_build_and_extract_round_trip():
    data = os.urandom(100_003)
    raw = bytes(msg.build(msg.KIND_ENVELOPE, "abcdef0123", "site-a", "site-b", data, part=2, total=3,
                          envelope_sha256="1" * 64, envelope_bytes=300_000))
    head, _ = msg.split_message(raw)
    h = msg.check_headers(msg.parse_header_fields(head))
    assert (h.envelope_id, h.sender, h.to, h.part, h.total) == ("abcdef0123", "site-a", "site-b", 2, 3)
    assert h.part_sha256 == hashlib.sha256(data).hexdigest()
    assert h.message_id == msg.message_id(msg.KIND_ENVELOPE, "abcdef0123", "site-b", 2, 3)
    _, payload = msg.extract_payload(raw)
    assert payload == data
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))  # RFC 5322 hard limit
    body = raw.split(b"base64\r\n\r\n", 1)[1]
    assert max(len(line) for line in body.split(b"\r\n")) == 76


def test_standard_mime_parses_with_the_email_package():
    import email
    from email import policy

    data = os.urandom(5000)
    raw = bytes(msg.build(msg.KIND_ENVELOPE, "abcdef0123", "site-a", "site-b", data,
                          envelope_sha256="1" * 64))
    m = email.message_from_bytes(raw, policy=policy.default)
    parts = [p for p in m.iter_attachments()]
    assert len(parts) == 1
    assert parts[0].get_content_type() == "application/octet-stream"
    assert parts[0].get_content() == data


def test_headers_carry_no_patient_data():
    raw = bytes(msg.build(msg.KIND_ENVELOPE, "abcdef0123", "site-a", "site-b", b"DOE^JOHN secret",
                          envelope_sha256="1" * 64))
    head, _ = msg.split_message(raw)
    assert b"DOE" not in head and b"DOE" not in raw  # the payload is base64, the headers are ids


def test_tampered_part_is_refused():
    data = os.urandom(10_000)
    raw = bytearray(msg.build(msg.KIND_ENVELOPE, "abcdef0123", "site-a", "site-b", data,
                              envelope_sha256="1" * 64))
    i = raw.index(b"Content-Transfer-Encoding: base64") + 200
    raw[i] = ord("A") if raw[i] != ord("A") else ord("B")
    with pytest.raises(InputError, match="digest mismatch"):
        msg.extract_payload(bytes(raw))


@pytest.mark.parametrize("field,value", [
    ("x-dtools-envelope", "../../etc"), ("x-dtools-envelope", "ABC"), ("x-dtools-from", "../x"),
    ("x-dtools-to", "a/b"), ("x-dtools-part", "0/1"), ("x-dtools-part", "3/2"), ("x-dtools-part-sha256", "zz"),
    ("x-dtools-kind", "other"),
])
def test_unsafe_headers_are_refused(field, value):
    raw = bytes(msg.build(msg.KIND_ENVELOPE, "abcdef0123", "site-a", "site-b", b"x", envelope_sha256="1" * 64))
    fields = msg.parse_header_fields(msg.split_message(raw)[0])
    fields[field] = value
    with pytest.raises(InputError):
        msg.check_headers(fields)


def test_message_ids_are_deterministic_and_distinct():
    a = msg.message_id(msg.KIND_ENVELOPE, "ab12", "site-b", 1, 2)
    assert a == msg.message_id(msg.KIND_ENVELOPE, "ab12", "site-b", 1, 2)
    assert len({a, msg.message_id(msg.KIND_ENVELOPE, "ab12", "site-b", 2, 2),
                msg.message_id(msg.KIND_ENVELOPE, "ab12", "site-c", 1, 2),
                msg.message_id(msg.KIND_RECEIPT, "ab12", "site-b")}) == 4


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400),
                                          ("1.5h", 5400), ("1w", 604800)])
def test_parse_age(text, seconds):
    assert parse_age(text, "--retry") == seconds


def test_parse_age_rejects_junk():
    with pytest.raises(UsageError, match="--retry"):
        parse_age("soon", "--retry")


def test_ledger_tracks_send_and_receipt(tmp_path):
    led = Ledger(tmp_path / "ledger.db")
    led.begin_send("ab12", "site-b", "/x.dtenv", 10, "0" * 64, 5, 2, "maildir:/r")
    led.part_done("ab12", "site-b", 1)
    led.part_done("ab12", "site-b", 1)
    assert led.parts_done("ab12", "site-b") == {1}
    assert not led.sent("ab12", "site-b")["complete"]
    led.complete("ab12", "site-b")
    assert [r["envelope_id"] for r in led.due_for_retry(0)] == ["ab12"]
    assert led.mark_receipt("ab12", "site-b", 3)
    assert led.due_for_retry(0) == []
    assert not led.mark_receipt("ffff", "site-b", 1)
    led.close()
    again = Ledger(tmp_path / "ledger.db")  # reopens without migrating twice
    assert again.sent("ab12", "site-b")["receipt_instances"] == 3


def test_ledger_from_newer_version_is_refused(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "l.db")
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(ConfigError, match="newer dtools"):
        Ledger(tmp_path / "l.db")


def test_maildir_append_is_idempotent(tmp_path):
    box = MaildirMailbox(parse_url(f"maildir:{tmp_path}/r"))
    raw = msg.build(msg.KIND_ENVELOPE, "abcdef0123", "site-a", "site-b", b"hello", envelope_sha256="1" * 64)
    box.append("dtools/site-b", raw)
    box.append("dtools/site-b", raw)
    assert len(os.listdir(tmp_path / "r" / "dtools" / "site-b" / "new")) == 1
    mid = msg.message_id(msg.KIND_ENVELOPE, "abcdef0123", "site-b")
    assert box.present("dtools/site-b", "abcdef0123", [mid, "<other>"]) == {mid}
    box.select("dtools/site-b")
    [(uid, size, head)] = box.list_messages()
    assert size == len(raw) and b"X-Dtools-Part: 1/1" in head
    assert box.fetch(uid) == bytes(raw)
    box.delete([uid])
    assert box.list_messages() == []
    assert os.listdir(tmp_path / "r" / "dtools" / "site-b" / "tmp") == []


def test_run_lock_refuses_a_second_run(tmp_path):
    with RunLock(tmp_path / "l", "dmail-recv"):
        with pytest.raises(TempFailure, match="another dmail-recv"):
            with RunLock(tmp_path / "l", "dmail-recv"):
                pass
    with RunLock(tmp_path / "l", "dmail-recv"):
        pass


def test_ledger_opened_by_two_processes_at_once(tmp_path):
    # dmail-recv and dmail-send --receipts in one pipe create the ledger concurrently.
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for n in range(5):
        path = tmp_path / f"l{n}.db"
        procs = [ctx.Process(target=_open_ledger, args=(path,)) for _ in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0, 0, 0, 0]
        assert Ledger(path).sent("x", "y") is None


def _open_ledger(path):
    Ledger(path).close()


@pytest.mark.parametrize("n", [0, 1, 56, 57, 58, 57 * 2048 - 1, 57 * 2048, 57 * 2048 + 1, 1_000_003])
def test_attachment_base64_is_what_encodebytes_writes_with_crlf(n):
    """RFC 2045 lines of 76 characters, CRLF-terminated, across block boundaries too."""
    import base64

    data = os.urandom(n)
    assert bytes(msg._b64_lines(data)) == base64.encodebytes(data).replace(b"\n", b"\r\n")
