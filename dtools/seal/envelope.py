"""Sealing and opening envelopes (see dtools-envelope(5) and dtools.seal.format).

A clear-text header (ids, sender, recipients, version) followed by a STREAM-style chunked
AES-256-GCM ciphertext and a trailer: the sender's Ed25519 signature (or, in passphrase
mode, an HMAC) over the header and the whole ciphertext. Memory stays constant: data moves
in chunks, and hashing runs on a worker thread beside the cipher.

The writing half is in envelope_write, the reading half in envelope_read; callers use
this module.
"""

from __future__ import annotations

from .envelope_read import Opened, find_sender, open_envelope  # noqa: F401 - this module's interface
from .envelope_write import Sealed, seal  # noqa: F401
from .format import (  # noqa: F401  (the format's names are part of this module's interface)
    AEAD_NAME, ARGON2, CHUNK, ENTRY_LEN, HPKE_SUITE, MAC_INFO, MAC_LEN, MAGIC, MAX_CHUNK, MAX_ENTRY, MAX_FILE,
    MAX_HEADER, MIN_CHUNK, MODE_KEYS, MODE_PASSPHRASE, PAYLOAD_INFO, PRELUDE, SIG_CONTEXT, SIG_LEN, SUFFIX, TAG,
    VERSION, WRAP_INFO, _HEX_ID, Entry, Header, _b64, _header_digest, _hkdf, _nonce, _sha256, _unb64, build_header,
    new_envelope_id, passphrase_key, read_header,
)
