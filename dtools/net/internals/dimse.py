"""DIMSE: C-STORE responses encoded directly, and incomplete C-STORE requests answered 0xC210 (3.0.x internals)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("dtools")

CANNOT_UNDERSTAND = 0xC210


def install(association: Any, dimse: Any) -> None:
    from pynetdicom import evt
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu_primitives import P_DATA

    from .. import fastpath

    send_msg = dimse.DIMSEServiceProvider.send_msg

    def send_msg_fast(self: Any, primitive: Any, context_id: int) -> None:
        if (type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None
                and primitive.Status is not None and primitive.OffendingElement is None
                and primitive.AffectedSOPClassUID and primitive.AffectedSOPInstanceUID
                and primitive.AffectedSOPClassUID.isascii() and primitive.AffectedSOPInstanceUID.isascii()
                and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)):
            command = fastpath.encode_store_rsp(primitive.MessageIDBeingRespondedTo, primitive.Status,
                                                primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID,
                                                primitive.ErrorComment)
            limit = self.maximum_pdu_size
            if not limit or len(command) + 6 <= limit:
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + command))  # last command fragment
                self.dul.send_pdu(pdata)
                return
        # Anything else (a UID that is not ASCII: pynetdicom echoes its bytes) the stock way
        send_msg(self, primitive, context_id)

    serve_request = association.Association._serve_request

    def serve_request_answering(self: Any, msg: Any, context_id: int) -> None:
        if type(msg) is C_STORE and msg.MessageID is not None and not msg.is_valid_request and not self._sent_release:
            # pynetdicom would log "unexpected message" and never answer: the peer waits
            # for its DIMSE timeout and aborts. PS3.7 C.4.2: 0xC210, cannot understand.
            missing = [k for k in C_STORE.REQUEST_KEYWORDS if getattr(msg, k) is None]
            comment = "the request has no " + ", ".join(missing)
            log.error("C-STORE from %s refused: %s", self.requestor.ae_title, comment)
            rsp = C_STORE()
            rsp.MessageIDBeingRespondedTo = msg.MessageID
            rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID
            rsp.AffectedSOPInstanceUID = msg.AffectedSOPInstanceUID
            rsp.Status = CANNOT_UNDERSTAND
            rsp.ErrorComment = comment[:64]
            self.dimse.send_msg(rsp, context_id)
            return
        serve_request(self, msg, context_id)

    dimse.DIMSEServiceProvider.send_msg = send_msg_fast
    association.Association._serve_request = serve_request_answering
