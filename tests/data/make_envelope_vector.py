#!/usr/bin/env python3
"""Regenerate the checked-in dtools envelope test vector (format version 1).

    python tests/data/make_envelope_vector.py

Writes tests/data/envelope-v1/: the envelope, the recipient's home (TEST-ONLY private
keys, never use them for anything else) with the sender configured as a peer, and
expected.json with what opening it must produce. The DICOM files inside are synthetic.
Regenerating changes every byte (fresh keys and randomness); commit the result.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

from test_seal_support import make_dicom  # noqa: E402

from dtools.config import Config  # noqa: E402
from dtools.seal import envelope, keys, sealing  # noqa: E402

OUT = HERE / "envelope-v1"
STUDY = "1.2.826.0.1.3680043.10.1234.1"
SERIES = "1.2.826.0.1.3680043.10.1234.1.1"


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "recipient").mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sender = keys.generate_identity(Config(tmp / "sender"), "vector-sender")
        recipient = keys.generate_identity(Config(OUT / "recipient"), "vector-recipient")
        files = [make_dicom(tmp / f"{i}.dcm", STUDY, SERIES, f"{SERIES}.{i}", pixels=bytes(range(256)) * 12,
                            patient="VECTOR^SYNTHETIC") for i in (1, 2, 3)]
        entries = [sealing.entry_for({"path": str(f)}) for f in files]
        eid = envelope.new_envelope_id()
        with open(OUT / "envelope.dtenv", "wb") as out:
            sealed = envelope.seal(out, eid, entries, identity=sender, recipients=[recipient.public()], chunk=4096)
    (OUT / "recipient" / "config.toml").write_text(
        f'[site]\nname = "vector-recipient"\n\n[peers.vector-sender]\nidentity = "{keys.format_public_identity(sender.public())}"\n'
    )
    expected = {
        "envelope_id": eid,
        "from": "vector-sender",
        "to": ["vector-recipient"],
        "sha256": sealed.sha256,
        "bytes": sealed.bytes,
        "chunk": 4096,
        "instances": [
            {"StudyInstanceUID": e.StudyInstanceUID, "SeriesInstanceUID": e.SeriesInstanceUID,
             "SOPInstanceUID": e.SOPInstanceUID, "size": e.size, "sha256": d}
            for e, d in zip(entries, sealed.digests)
        ],
    }
    (OUT / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
