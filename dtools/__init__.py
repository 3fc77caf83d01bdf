"""dtools: index, search and exchange DICOM studies between sites through an IMAP relay."""

from ._version import __version__

__all__ = ["__version__"]
