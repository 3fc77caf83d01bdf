"""dretrieve --wait: take delivery of the envelopes a retrieve request brings, and nothing else.

The envelopes come to the site's ordinary folder, like any study. This takes only those
its answer named (or that carry its request id), opens and indexes them, and deposits
their receipts, as the receive pipeline would; all other mail is left to the receive job.
If the receive job takes them first, that is just as good: the ledger says when they are
opened.
"""

from __future__ import annotations

import time
from typing import Callable

from ..errors import InputError, TempFailure
from ..exchange.ledger import Ledger
from ..mail.common import RunLock
from ..mail.receiver import Receiver
from ..seal.opening import Opener
from .asking import Asker


class Taker:
    def __init__(self, asker: Asker, fail: Callable[[str, str], None], log: Callable[[str], None]):
        self.asker = asker
        self.config = asker.config
        self.ledger: Ledger = asker.ledger
        self.fail = fail
        self.log = log
        self.envelopes: set[str] = set()  # the envelopes the answers named
        self.rids: set[str] = set()
        self.opener = Opener(self.config, asker.identity, asker.peers, ledger=self.ledger)
        url, self.box = asker.sender.mailbox(None)  # shared; the asker closes it
        self.rx = Receiver(self.config, self.ledger, asker.site, url, self.box, emit=self._envelope, fail=fail,
                           want=lambda eid, rid: eid in self.envelopes or (rid is not None and rid in self.rids))

    def close(self) -> None:
        self.opener.close()

    def outstanding(self) -> set[str]:
        return {e for e in self.envelopes if self.ledger.opened(e) is None}

    def _envelope(self, rec: dict) -> None:
        from pathlib import Path

        try:
            result = self.opener.open(Path(rec["path"]), record=True)
        except InputError as exc:
            self.fail(rec["path"], f"{exc}; nothing was written")
            return
        for sop, why in result.refused:
            self.fail(f"envelope {result.envelope_id} from {result.peer}", f"instance {sop} {why}")
        if result.replay is None:
            self.log(f"opened {result.envelope_id} from {result.peer}: {len(result.records)} file(s)")
            row = self.ledger.opened(result.envelope_id)
            if row is not None and row["receipt_owed"]:
                self.asker.sender.send_receipt(self.asker.identity, result.envelope_id, row["sender"],
                                               row["instances"])

    def take(self, deadline: float) -> None:
        """Receive and open what was asked for until it is all opened here, or the deadline."""
        while self.outstanding():
            try:
                # The receive job's lock: never in its way, never both taking one message.
                with RunLock(self.config.dir("spool") / ".dmail-recv.lock", "dmail-recv"):
                    self.rx.sync()
            except TempFailure:
                pass  # the receive job is at it: the ledger will show what it opened
            if not self.outstanding():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.box.wait(min(left, 5.0))
