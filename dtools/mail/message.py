"""The MIME form of one envelope part (or one receipt) on the relay, built and parsed by hand.

Headers carry only identifiers and digests: the envelope id, part i/n, SHA-256 sums and
site names. Never patient data. The body is built and read without the email package's
object model so that a 20 MiB part costs a few copies of itself, not a tree of objects.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import re
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from typing import Callable

from ..errors import InputError

KIND_ENVELOPE = "envelope"  # studies and catalogs, for the receive job
KIND_RECEIPT = "receipt"
KIND_REQUEST = "request"  # queries and retrieve requests, for the serving side (dserve --relay)
KIND_ANSWER = "answer"  # answers and refusals, for whoever asked (dsearch --live, dretrieve)
ENVELOPE_KINDS = (KIND_ENVELOPE, KIND_REQUEST, KIND_ANSWER)  # sealed envelopes, split into parts
# Each kind has its own relay folder, so that the receive job, the serving side and a
# command waiting for its answer never take each other's messages.
FOLDER_SUFFIX = {KIND_ENVELOPE: "", KIND_RECEIPT: "", KIND_REQUEST: "-requests", KIND_ANSWER: "-answers"}

H_KIND = "X-Dtools-Kind"
H_ENVELOPE = "X-Dtools-Envelope"
H_FROM = "X-Dtools-From"
H_TO = "X-Dtools-To"
H_PART = "X-Dtools-Part"
H_PART_SHA = "X-Dtools-Part-SHA256"
H_ENV_SHA = "X-Dtools-Envelope-SHA256"
H_ENV_BYTES = "X-Dtools-Envelope-Bytes"
H_SIGNATURE = "X-Dtools-Signature"
H_REQUEST = "X-Dtools-Request"
HEADER_FIELDS = (H_KIND, H_ENVELOPE, H_FROM, H_TO, H_PART, H_PART_SHA, H_ENV_SHA, H_ENV_BYTES, H_SIGNATURE,
                 H_REQUEST, "Message-ID")

# Room left in --max-message-size for headers, the text part and MIME boundaries.
HEADER_ALLOWANCE = 4096
MIN_MESSAGE_SIZE = 64 * 1024
_LINE_RAW = 57  # 57 raw bytes -> 76 base64 characters + CRLF = 78 bytes on the wire
_LINE = 76
_BLOCK = _LINE_RAW * 2048

_ENVELOPE_ID = re.compile(r"^[0-9a-f]{8,128}$")
_SITE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
_PART = re.compile(r"^([0-9]{1,6})/([0-9]{1,6})$")
MAX_PARTS = 100000
PART_SIG_CONTEXT = b"dtools-relay v1 part\x00"


def check_envelope_id(value: object) -> str:
    if not isinstance(value, str) or not _ENVELOPE_ID.match(value):
        raise InputError(f"envelope id {str(value)[:80]!r} is not lowercase hex")
    return value


def check_site(value: object, what: str = "site name") -> str:
    if not isinstance(value, str) or not _SITE.match(value):
        raise InputError(f"{what} {str(value)[:80]!r} is not valid (letters, digits, '.', '_', '-')")
    return value


def part_payload_size(max_message_size: int) -> int:
    """Raw bytes per part so that the encoded message stays within ``max_message_size``."""
    usable = max(max_message_size, MIN_MESSAGE_SIZE) - HEADER_ALLOWANCE
    lines = usable // (_LINE_RAW + 21)  # 78 bytes per line of 57 raw bytes
    return max(lines, 1) * _LINE_RAW


def message_id(kind: str, envelope_id: str, to: str, part: int = 1, total: int = 1) -> str:
    """Deterministic, so a rerun finds the copy it already deposited instead of adding another."""
    if kind == KIND_RECEIPT:
        return f"<dtools.receipt.{envelope_id}.{to}@dtools.invalid>"
    if kind != KIND_ENVELOPE:
        return f"<dtools.{kind}.{envelope_id}.{to}.{part}-{total}@dtools.invalid>"
    return f"<dtools.{envelope_id}.{to}.{part}-{total}@dtools.invalid>"


def folder_of(url, site: str, kind: str) -> str:
    """The relay folder where messages of ``kind`` for ``site`` go (BASE/SITE, BASE/SITE-requests...)."""
    return url.folder(site + FOLDER_SUFFIX[kind])


def check_request_id(value: object) -> str:
    if not isinstance(value, str) or not _REQUEST_ID.match(value):
        raise InputError(f"request id {str(value)[:80]!r} is not 32 lowercase hex digits")
    return value


def part_statement(kind: str, envelope_id: str, sender: str, to: str, part: int, total: int, part_sha256: str,
                   envelope_sha256: str | None, envelope_bytes: int | None, request_id: str | None = None) -> bytes:
    """What a part's signature covers: every header a receiver acts on, and the part's digest.

    A stranger with write access to the relay can copy these headers but not sign them, so a
    forged part is recognised alone and the genuine set still completes."""
    fields = [kind, envelope_id, sender, to, f"{part}/{total}", part_sha256, envelope_sha256 or "",
              "" if envelope_bytes is None else str(envelope_bytes), request_id or ""]
    return PART_SIG_CONTEXT + "\n".join(fields).encode("ascii")


def _b64_lines(data: bytes | memoryview) -> bytearray:
    """Base64 in lines of 76 characters, each ending in CRLF (RFC 2045), as
    base64.encodebytes writes them but with CRLF. Each block is encoded by one C call and
    cut into lines by slicing: encodebytes makes a Python call per 57-byte line, which was
    half of dmail-send's time."""
    out = bytearray()
    view = memoryview(data)
    b2a = binascii.b2a_base64
    for start in range(0, len(view), _BLOCK):
        enc = b2a(view[start:start + _BLOCK], newline=False)
        out += b"\r\n".join([enc[i:i + _LINE] for i in range(0, len(enc), _LINE)])
        out += b"\r\n"
    return out


def _headers(fields: list[tuple[str, str]]) -> bytes:
    return b"".join(f"{k}: {v}\r\n".encode("ascii") for k, v in fields)


def build(kind: str, envelope_id: str, sender: str, to: str, payload: bytes | memoryview, *,
          part: int = 1, total: int = 1, envelope_sha256: str = "", envelope_bytes: int = 0,
          filename: str = "", content_type: str = "application/octet-stream",
          signature: bytes | None = None, sign: Callable[[bytes], bytes] | None = None,
          date: float | None = None, request_id: str | None = None) -> bytearray:
    """One complete RFC 5322 message (CRLF line ends) carrying ``payload`` as a base64 attachment.

    ``sign`` (an envelope part): the sender's signing function, applied to the part's
    identifying headers (see ``part_statement``), so that each part is verifiable alone.
    """
    part_sha = hashlib.sha256(payload).hexdigest()
    if sign is not None:
        signature = sign(part_statement(kind, envelope_id, sender, to, part, total, part_sha,
                                        envelope_sha256 or None, envelope_bytes or None, request_id))
    boundary = f"dtools-{part_sha[:32]}"
    if kind == KIND_RECEIPT:
        subject = f"dtools receipt {envelope_id}"
        text = "Signed dtools delivery receipt. It holds no patient data.\r\n"
    elif kind != KIND_ENVELOPE:
        subject = f"dtools {kind} {envelope_id} part {part}/{total}"
        text = f"One part of a sealed dtools {kind}.\r\nThe attachment is encrypted.\r\n"
    else:
        subject = f"dtools envelope {envelope_id} part {part}/{total}"
        text = "One part of a sealed dtools envelope.\r\nThe attachment is encrypted; dmail-recv reassembles it.\r\n"
    fields = [
        ("From", f"dtools {sender} <{sender}@dtools.invalid>"),
        ("To", f"dtools {to} <{to}@dtools.invalid>"),
        ("Subject", subject),
        ("Date", email.utils.formatdate(date, localtime=False)),
        ("Message-ID", message_id(kind, envelope_id, to, part, total)),
        ("MIME-Version", "1.0"),
        (H_KIND, kind),
        (H_ENVELOPE, envelope_id),
        (H_FROM, sender),
        (H_TO, to),
        (H_PART, f"{part}/{total}"),
        (H_PART_SHA, part_sha),
    ]
    if envelope_sha256:
        fields.append((H_ENV_SHA, envelope_sha256))
    if envelope_bytes:
        fields.append((H_ENV_BYTES, str(envelope_bytes)))
    if request_id:
        fields.append((H_REQUEST, check_request_id(request_id)))
    if signature is not None:
        fields.append((H_SIGNATURE, base64.b64encode(signature).decode("ascii")))
    fields.append(("Content-Type", f'multipart/mixed;\r\n boundary="{boundary}"'))
    name = filename or (f"{envelope_id}.receipt.json" if kind == KIND_RECEIPT else f"{envelope_id}.{part:05d}.part")
    out = bytearray(_headers(fields))
    out += b"\r\n"
    out += f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n{text}".encode("ascii")
    out += (
        f"--{boundary}\r\nContent-Type: {content_type}\r\n"
        f'Content-Disposition: attachment; filename="{name}"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\n"
    ).encode("ascii")
    out += _b64_lines(payload)
    out += f"--{boundary}--\r\n".encode("ascii")
    return out


@dataclass
class PartHeaders:
    """What the headers of one relay message say, validated so that it is safe to use in paths."""

    kind: str
    envelope_id: str
    sender: str
    to: str
    part: int
    total: int
    part_sha256: str
    envelope_sha256: str | None
    envelope_bytes: int | None
    message_id: str | None
    signature: bytes | None = None
    request_id: str | None = None

    def statement(self) -> bytes:
        """The bytes an envelope part's X-Dtools-Signature signs."""
        return part_statement(self.kind, self.envelope_id, self.sender, self.to, self.part, self.total,
                              self.part_sha256, self.envelope_sha256, self.envelope_bytes, self.request_id)


def parse_header_fields(raw: bytes) -> dict[str, str]:
    msg = BytesHeaderParser(policy=compat32).parsebytes(raw)
    return {k.lower(): str(v).strip() for k, v in msg.items()}


def check_headers(fields: dict[str, str]) -> PartHeaders:
    """Validate the dtools headers of a message; InputError names what is wrong."""
    kind = fields.get(H_KIND.lower())
    if kind not in (KIND_ENVELOPE, KIND_RECEIPT, KIND_REQUEST, KIND_ANSWER):
        raise InputError(f"not a dtools message ({H_KIND}: {str(kind)[:40]!r})")
    envelope_id = check_envelope_id(fields.get(H_ENVELOPE.lower()))
    sender = check_site(fields.get(H_FROM.lower()), "sender site")
    to = check_site(fields.get(H_TO.lower()), "addressee site")
    m = _PART.match(fields.get(H_PART.lower(), ""))
    if not m:
        raise InputError(f"bad {H_PART} header")
    part, total = int(m.group(1)), int(m.group(2))
    if not (1 <= part <= total <= MAX_PARTS):
        raise InputError(f"bad {H_PART} header {part}/{total}")
    part_sha = fields.get(H_PART_SHA.lower(), "")
    if not _SHA.match(part_sha):
        raise InputError(f"bad {H_PART_SHA} header")
    env_sha = fields.get(H_ENV_SHA.lower())
    if env_sha is not None and not _SHA.match(env_sha):
        raise InputError(f"bad {H_ENV_SHA} header")
    env_bytes = fields.get(H_ENV_BYTES.lower())
    if env_bytes is not None:
        if not env_bytes.isdigit():
            raise InputError(f"bad {H_ENV_BYTES} header")
    signature = None
    if fields.get(H_SIGNATURE.lower()):
        try:
            signature = base64.b64decode(fields[H_SIGNATURE.lower()], validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"bad {H_SIGNATURE} header") from None
    if kind in ENVELOPE_KINDS and env_sha is None:
        raise InputError(f"missing {H_ENV_SHA} header")
    request_id = fields.get(H_REQUEST.lower())
    if request_id is not None:
        request_id = check_request_id(request_id)
    elif kind in (KIND_REQUEST, KIND_ANSWER):
        raise InputError(f"missing {H_REQUEST} header")
    return PartHeaders(kind, envelope_id, sender, to, part, total, part_sha, env_sha,
                       int(env_bytes) if env_bytes is not None else None,
                       fields.get("message-id"), signature, request_id)


def split_message(raw: bytes) -> tuple[bytes, memoryview]:
    """(header block, body) of a raw message, without copying the body."""
    view = memoryview(raw)
    for sep in (b"\r\n\r\n", b"\n\n"):
        i = raw.find(sep)
        if i >= 0:
            return bytes(view[:i + len(sep)]), view[i + len(sep):]
    raise InputError("message has no body")


_BOUNDARY = re.compile(rb'boundary="?([^";\r\n]+)"?', re.I)


def extract_payload(raw: bytes, headers: PartHeaders | None = None) -> tuple[PartHeaders, bytes]:
    """The validated headers and the decoded attachment of one message; the digest is checked."""
    head, _body = split_message(raw)
    if headers is None:
        headers = check_headers(parse_header_fields(head))
    m = _BOUNDARY.search(head)
    if not m:
        raise InputError("message is not multipart")
    delim = b"--" + m.group(1)
    # The attachment is the part whose headers say base64; find its body start.
    pos = 0
    payload_start = payload_end = -1
    while True:
        i = raw.find(delim, pos)
        if i < 0:
            break
        ends = [(k, n) for k, n in ((raw.find(b"\r\n\r\n", i, i + 4096), 4), (raw.find(b"\n\n", i, i + 4096), 2)) if k >= 0]
        if not ends:
            break
        j, skip = min(ends)
        part_head = raw[i:j].lower()
        if b"content-transfer-encoding: base64" in part_head:
            payload_start = j + skip
            payload_end = raw.find(delim, payload_start)
            break
        pos = i + len(delim)
    if payload_start < 0 or payload_end < 0:
        raise InputError("message has no base64 attachment")
    try:
        payload = binascii.a2b_base64(memoryview(raw)[payload_start:payload_end])
    except binascii.Error as exc:
        raise InputError(f"attachment is not valid base64 ({exc})") from None
    digest = hashlib.sha256(payload).hexdigest()
    if digest != headers.part_sha256:
        raise InputError(f"part {headers.part}/{headers.total} digest mismatch (damaged or tampered in the relay)")
    return headers, payload
