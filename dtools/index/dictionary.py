"""The DICOM data dictionary entries of the attributes the index stores.

A query needs the VR and VM of its keys. pydicom's dictionary has them, but importing it
loads all of pydicom (about 100 ms), which a cron job running ``dsearch --count`` every
minute should not pay. tests/test_query.py checks this table against pydicom's.
"""

from __future__ import annotations

# keyword -> (tag, VR, VM)
ENTRIES: dict[str, tuple[int, str, str]] = {
    # patient
    "PatientName": (0x00100010, "PN", "1"),
    "PatientID": (0x00100020, "LO", "1"),
    "IssuerOfPatientID": (0x00100021, "LO", "1"),
    "PatientBirthDate": (0x00100030, "DA", "1"),
    "PatientSex": (0x00100040, "CS", "1"),
    "NumberOfPatientRelatedStudies": (0x00201200, "IS", "1"),
    "NumberOfPatientRelatedSeries": (0x00201202, "IS", "1"),
    "NumberOfPatientRelatedInstances": (0x00201204, "IS", "1"),
    # study
    "StudyInstanceUID": (0x0020000D, "UI", "1"),
    "StudyDate": (0x00080020, "DA", "1"),
    "StudyTime": (0x00080030, "TM", "1"),
    "AccessionNumber": (0x00080050, "SH", "1"),
    "StudyID": (0x00200010, "SH", "1"),
    "StudyDescription": (0x00081030, "LO", "1"),
    "ReferringPhysicianName": (0x00080090, "PN", "1"),
    "PatientAge": (0x00101010, "AS", "1"),
    "ModalitiesInStudy": (0x00080061, "CS", "1-n"),
    "NumberOfStudyRelatedSeries": (0x00201206, "IS", "1"),
    "NumberOfStudyRelatedInstances": (0x00201208, "IS", "1"),
    # series
    "SeriesInstanceUID": (0x0020000E, "UI", "1"),
    "Modality": (0x00080060, "CS", "1"),
    "SeriesNumber": (0x00200011, "IS", "1"),
    "SeriesDescription": (0x0008103E, "LO", "1"),
    "BodyPartExamined": (0x00180015, "CS", "1"),
    "SeriesDate": (0x00080021, "DA", "1"),
    "SeriesTime": (0x00080031, "TM", "1"),
    "ProtocolName": (0x00181030, "LO", "1"),
    "InstitutionName": (0x00080080, "LO", "1"),
    "StationName": (0x00081010, "SH", "1"),
    "NumberOfSeriesRelatedInstances": (0x00201209, "IS", "1"),
    # instance
    "SOPInstanceUID": (0x00080018, "UI", "1"),
    "SOPClassUID": (0x00080016, "UI", "1"),
    "InstanceNumber": (0x00200013, "IS", "1"),
    "TransferSyntaxUID": (0x00020010, "UI", "1"),
    "ContentDate": (0x00080023, "DA", "1"),
    "ContentTime": (0x00080033, "TM", "1"),
    "NumberOfFrames": (0x00280008, "IS", "1"),
    "Rows": (0x00280010, "US", "1"),
    "Columns": (0x00280011, "US", "1"),
}
TAGS: dict[int, str] = {tag: kw for kw, (tag, _, _) in ENTRIES.items()}
