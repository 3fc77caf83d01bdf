"""pynetdicom wiring for the DICOM SCP and SCU."""
