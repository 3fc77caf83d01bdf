"""The Query service of dserve: C-FIND on the index, through the one query engine dsearch uses.

Queries open their own read-only index connection, so a long C-FIND never blocks stores (WAL).
Also the identifier handling that retrieval shares: levels, models, keys.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterator

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from ...errors import DtoolsError
from .statuses import CANCEL, CANNOT_UNDERSTAND, IDENTIFIER_MISMATCH, OUT_OF_RESOURCES, PENDING, SUCCESS, QueryError, status

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("dtools")

LEVELS = {"PATIENT": "patient", "STUDY": "study", "SERIES": "series", "IMAGE": "instance"}
PATIENT_ROOT = {
    "1.2.840.10008.5.1.4.1.2.1.1",  # Patient Root Query/Retrieve Information Model - FIND
    "1.2.840.10008.5.1.4.1.2.1.2",  # - MOVE
    "1.2.840.10008.5.1.4.1.2.1.3",  # - GET
}


def model_of(sop_class: Any) -> str:
    return "patient" if str(sop_class) in PATIENT_ROOT else "study"


def query_level(ident: Dataset, model: str, retrieve: bool = False) -> str:
    """The identifier's Query/Retrieve Level, checked against the information model.

    PATIENT is not a level of the Study Root model. A C-FIND there is refused (0xA900);
    a C-MOVE or C-GET is served, as Orthanc and DCMTK's dcmqrscp do, because PACS such as
    Orthanc send them and a patient can only be retrieved that way from them.
    """
    level = str(ident.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS:
        raise QueryError(IDENTIFIER_MISMATCH, f"Query/Retrieve Level {level!r} is not PATIENT, STUDY, SERIES or IMAGE")
    if model == "study" and level == "PATIENT" and not retrieve:
        raise QueryError(IDENTIFIER_MISMATCH, "PATIENT level is not part of the Study Root model")
    return level


class QueryService:
    """C-FIND at every level of Patient Root and Study Root."""

    def __init__(self, server: "Server"):
        self.server = server

    def on_find(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        bridge = self.server.bridge
        peer = bridge.peer_of(event.assoc) if bridge is not None else None
        if peer is not None:
            yield from bridge.find(event, peer)
            return
        calling = event.assoc.requestor.ae_title
        try:
            ident = event.identifier
            level = query_level(ident, model_of(event.request.AffectedSOPClassUID))
            keys, wanted = identifier_keys(ident)
        except QueryError as exc:
            log.error("C-FIND from %s refused: %s", calling, exc)
            yield status(exc.code, str(exc)), None
            return
        except Exception as exc:  # noqa: BLE001
            log.error("C-FIND from %s refused: cannot decode the identifier (%s)", calling, exc)
            yield status(CANNOT_UNDERSTAND, "cannot decode the identifier"), None
            return
        from ...index.db import open_index
        from ...index.query import find

        try:
            conn = open_index(self.server.s.index_path, readonly=True)
        except Exception as exc:  # noqa: BLE001
            log.error("C-FIND: cannot open the index (%s)", exc)
            yield status(OUT_OF_RESOURCES, "index unavailable"), None
            return
        try:
            results = find(conn, LEVELS[level], keys, strict=False)
            n = 0
            while True:
                if event.is_cancelled:
                    yield CANCEL, None
                    return
                try:
                    row = next(results)
                except StopIteration:
                    break
                n += 1
                yield PENDING, response(wanted, row, level, self.server.s.aet)
            log.info("C-FIND %s level from %s: %d matches", level, calling, n)
        except DtoolsError as exc:
            # the message may quote key values (patient data): details only with -v
            log.error("C-FIND from %s refused: a key value cannot be understood", calling)
            log.info("C-FIND refused: %s", exc)
            yield status(CANNOT_UNDERSTAND, str(exc)), None
            return
        except Exception as exc:  # noqa: BLE001 - sqlite busy, disk errors
            log.error("C-FIND failed: %s", exc)
            yield status(OUT_OF_RESOURCES, "query failed"), None
            return
        finally:
            conn.close()
        yield SUCCESS, None


# -- identifier <-> index keys -----------------------------------------------------------
_SKIP = {0x00080052, 0x00080005}  # QueryRetrieveLevel, SpecificCharacterSet


def element_text(elem: Any) -> str | None:
    """An identifier element as a DICOM string (None for sequences, which we don't match)."""
    if elem.VR == "SQ":
        return None
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def identifier_keys(ident: Dataset) -> tuple[dict[str, str], list[Any]]:
    """Matching/return keys for the query engine, and the identifier's elements to answer.

    Keys the index does not store are not matched and come back empty (PS3.4 C.2.2.1);
    the engine ignores them (strict=False).
    """
    keys: dict[str, str] = {}
    wanted = []
    for elem in ident:
        if elem.tag in _SKIP or elem.tag.group == 0x0002 or elem.tag.is_private or not elem.keyword:
            continue
        wanted.append(elem)
        text = element_text(elem)
        if text is not None:
            keys[elem.keyword] = text
    return keys, wanted


_INT_VRS = {"US", "UL", "SS", "SL", "UV", "SV"}
_FLOAT_VRS = {"FL", "FD"}


def _convert(vr: str, value: Any) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, list):
        return [_convert(vr, v) for v in value]
    if vr in _INT_VRS:
        return int(value)
    if vr in _FLOAT_VRS:
        return float(value)
    return str(value)


def response(wanted: list[Any], row: dict, level: str, aet: str, availability: str = "ONLINE") -> Dataset:
    """A C-FIND response: the requested keys, filled from the index row."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level
    for elem in wanted:
        kw = elem.keyword
        vr = elem.VR
        value: Any = None
        if kw == "RetrieveAETitle":
            value = aet
        elif kw == "InstanceAvailability":
            value = availability
        elif kw and vr != "SQ" and kw in row:
            try:
                value = _convert(vr, row[kw])
            except (TypeError, ValueError):
                value = None
        if vr == "SQ":
            ds.add_new(elem.tag, vr, [])
        else:
            ds.add_new(elem.tag, vr, value)
    return ds
