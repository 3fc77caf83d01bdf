"""dtools: index, search and exchange DICOM studies between sites through an IMAP relay."""

__version__ = "0.1.0"
