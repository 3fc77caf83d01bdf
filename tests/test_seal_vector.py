"""The checked-in envelope test vector opens, both with dseal and with an independent
reader written from dtools-envelope(5) using only cryptography's primitives."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import struct
from pathlib import Path

from conftest import run
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import load_pem_private_key

VECTOR = Path(__file__).parent / "data" / "envelope-v1"


def expected() -> dict:
    return json.loads((VECTOR / "expected.json").read_text())


def test_dseal_opens_the_vector(tmp_path):
    home = tmp_path / "home"
    shutil.copytree(VECTOR / "recipient", home)
    env = tmp_path / "in.dtenv"
    shutil.copy(VECTOR / "envelope.dtenv", env)
    want = expected()
    assert hashlib.sha256(env.read_bytes()).hexdigest() == want["sha256"]
    r = run("dseal", "--home", str(home), "--open", str(env))
    assert r.returncode == 0, r.stderr
    got = r.records
    assert len(got) == len(want["instances"])
    for rec, inst in zip(got, want["instances"]):
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "size", "sha256"):
            assert rec[key] == inst[key]
        assert rec["envelope_id"] == want["envelope_id"] and rec["peer"] == "vector-sender"
        path = Path(rec["path"])
        assert path == home / "archive" / inst["StudyInstanceUID"] / inst["SeriesInstanceUID"] / f"{inst['SOPInstanceUID']}.dcm"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == inst["sha256"]
        assert path.read_bytes()[128:132] == b"DICM"


def test_independent_reader_follows_the_man_page():
    """Decrypt and verify the vector step by step as dtools-envelope(5) describes."""
    data = (VECTOR / "envelope.dtenv").read_bytes()
    want = expected()
    magic, version, reserved, hlen = struct.unpack(">6sBBI", data[:12])
    assert (magic, version, reserved) == (b"DTENV\x00", 1, 0)
    head = data[: 12 + hlen]
    header = json.loads(data[12 : 12 + hlen])
    assert header["v"] == 1 and header["mode"] == "x25519" and header["aead"] == "AES-256-GCM"
    assert header["id"] == want["envelope_id"] and header["from"] == "vector-sender"
    assert [r["name"] for r in header["to"]] == ["vector-recipient"]
    eid = bytes.fromhex(header["id"])

    # Signature: Ed25519 over the context string and SHA-256(prelude || header || ciphertext).
    sender_line = (VECTOR / "recipient" / "config.toml").read_text().split('identity = "')[1].split('"')[0]
    sender = Ed25519PublicKey.from_public_bytes(base64.b64decode(sender_line.split()[3]))
    body, sig = data[len(head) : -64], data[-64:]
    sender.verify(sig, b"dtools-envelope v1 signature\x00" + hashlib.sha256(head + body).digest())

    # Content key: HPKE base mode, X25519 / HKDF-SHA256 / ChaCha20-Poly1305, info binds the id.
    priv = load_pem_private_key((VECTOR / "recipient" / "keys" / "x25519.key").read_bytes(), None)
    suite = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.CHACHA20_POLY1305)
    content_key = suite.decrypt(base64.b64decode(header["to"][0]["wrap"]), priv, b"dtools-envelope v1 wrap " + eid)
    payload_key = HKDF(hashes.SHA256(), 32, eid, b"dtools-envelope v1 payload key").derive(content_key)

    # STREAM chunks: nonce = 11-byte big-endian counter || last flag; AAD = SHA-256(prelude || header).
    aad = hashlib.sha256(head).digest()
    step = header["chunk"] + 16
    pieces = [body[i : i + step] for i in range(0, len(body), step)]
    assert len(pieces) >= 3
    aead = AESGCM(payload_key)
    plain = b"".join(aead.decrypt(i.to_bytes(11, "big") + bytes([i == len(pieces) - 1]), c, aad)
                     for i, c in enumerate(pieces))

    # Payload: (u32 length, entry JSON, data, SHA-256 of data)*, then u32 0.
    pos, found = 0, []
    while True:
        (n,) = struct.unpack(">I", plain[pos : pos + 4])
        pos += 4
        if n == 0:
            break
        entry = json.loads(plain[pos : pos + n])
        pos += n
        content = plain[pos : pos + entry["size"]]
        pos += entry["size"]
        assert plain[pos : pos + 32] == hashlib.sha256(content).digest()
        pos += 32
        assert entry["type"] == "file"
        assert entry["name"] == f"{entry['StudyInstanceUID']}/{entry['SeriesInstanceUID']}/{entry['SOPInstanceUID']}.dcm"
        found.append({"SOPInstanceUID": entry["SOPInstanceUID"], "sha256": hashlib.sha256(content).hexdigest()})
    assert pos == len(plain)
    assert found == [{"SOPInstanceUID": i["SOPInstanceUID"], "sha256": i["sha256"]} for i in want["instances"]]
