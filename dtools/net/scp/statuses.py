"""DIMSE statuses dserve answers with (PS3.4 Annexes B and C, PS3.7 Annex C), and the
error its services raise to answer one of them with a comment."""

from __future__ import annotations

from pydicom.dataset import Dataset

SUCCESS = 0x0000
PENDING = 0xFF00
CANCEL = 0xFE00
WARNING = 0xB000  # sub-operations complete, one or more failures
OUT_OF_RESOURCES = 0xA700
SUBOPS_FAILED = 0xA702  # out of resources, unable to perform sub-operations
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC210


def status(code: int, comment: str | None = None) -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]  # LO
    return ds


class QueryError(Exception):
    """A request dserve refuses: answered with `code` and the message as Error Comment."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
