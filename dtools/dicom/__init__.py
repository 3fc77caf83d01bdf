"""DICOM files: header parsing into records, charset handling and the archive layout."""
