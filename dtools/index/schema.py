"""What the index stores at each level, and the versioned migrations that build it.

Each level keeps the attributes C-FIND returns there; every other text attribute goes
into the FTS5 table ``instance_text`` (rowid = instance id) for free text.
"""

from __future__ import annotations

LEVELS = ("patient", "study", "series", "instance")
TABLE = {"patient": "patient", "study": "study", "series": "series", "instance": "instance"}
ALIAS = {"patient": "p", "study": "st", "series": "se", "instance": "i"}
PARENT = {"study": ("patient", "patient_id"), "series": ("study", "study_id"), "instance": ("series", "series_id")}

# keyword -> SQL type; the order is the order of fields in records
LEVEL_ATTRS: dict[str, dict[str, str]] = {
    "patient": {
        "PatientName": "TEXT",
        "PatientID": "TEXT",
        "IssuerOfPatientID": "TEXT",
        "PatientBirthDate": "TEXT",
        "PatientSex": "TEXT",
        "NumberOfPatientRelatedStudies": "INTEGER",
        "NumberOfPatientRelatedSeries": "INTEGER",
        "NumberOfPatientRelatedInstances": "INTEGER",
    },
    "study": {
        "StudyInstanceUID": "TEXT",
        "StudyDate": "TEXT",
        "StudyTime": "TEXT",
        "AccessionNumber": "TEXT",
        "StudyID": "TEXT",
        "StudyDescription": "TEXT",
        "ReferringPhysicianName": "TEXT",
        "PatientAge": "TEXT",
        "ModalitiesInStudy": "TEXT",
        "NumberOfStudyRelatedSeries": "INTEGER",
        "NumberOfStudyRelatedInstances": "INTEGER",
    },
    "series": {
        "SeriesInstanceUID": "TEXT",
        "Modality": "TEXT",
        "SeriesNumber": "INTEGER",
        "SeriesDescription": "TEXT",
        "BodyPartExamined": "TEXT",
        "SeriesDate": "TEXT",
        "SeriesTime": "TEXT",
        "ProtocolName": "TEXT",
        "InstitutionName": "TEXT",
        "StationName": "TEXT",
        "NumberOfSeriesRelatedInstances": "INTEGER",
    },
    "instance": {
        "SOPInstanceUID": "TEXT",
        "SOPClassUID": "TEXT",
        "InstanceNumber": "INTEGER",
        "TransferSyntaxUID": "TEXT",
        "ContentDate": "TEXT",
        "ContentTime": "TEXT",
        "NumberOfFrames": "INTEGER",
        "Rows": "INTEGER",
        "Columns": "INTEGER",
    },
}
# computed by the index, not read from files
COMPUTED = {
    "NumberOfPatientRelatedStudies",
    "NumberOfPatientRelatedSeries",
    "NumberOfPatientRelatedInstances",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "NumberOfSeriesRelatedInstances",
}
# person names also get an upper-case shadow column, so PN matching ignores case
PN_ATTRS = {"PatientName", "ReferringPhysicianName"}
UNIQUE_KEY = {"patient": "PatientID", "study": "StudyInstanceUID", "series": "SeriesInstanceUID", "instance": "SOPInstanceUID"}
FILE_FIELDS = ("path", "size", "mtime")


def _columns(level: str) -> str:
    cols = []
    for kw, typ in LEVEL_ATTRS[level].items():
        cols.append(f"{kw} {typ}")
        if kw in PN_ATTRS:
            cols.append(f"{kw}_ci TEXT")
    return ",\n  ".join(cols)


MIGRATIONS: list[str] = [
    # 1: the four levels and free text
    f"""
CREATE TABLE patient (
  id INTEGER PRIMARY KEY,
  patient_key TEXT NOT NULL UNIQUE,
  {_columns("patient")}
);
CREATE TABLE study (
  id INTEGER PRIMARY KEY,
  patient_id INTEGER NOT NULL REFERENCES patient(id),
  {_columns("study")}
);
CREATE UNIQUE INDEX study_uid ON study(StudyInstanceUID);
CREATE TABLE series (
  id INTEGER PRIMARY KEY,
  study_id INTEGER NOT NULL REFERENCES study(id),
  {_columns("series")}
);
CREATE UNIQUE INDEX series_uid ON series(SeriesInstanceUID);
CREATE TABLE instance (
  id INTEGER PRIMARY KEY,
  series_id INTEGER NOT NULL REFERENCES series(id),
  {_columns("instance")},
  path TEXT NOT NULL UNIQUE,
  size INTEGER NOT NULL,
  mtime_ns INTEGER NOT NULL
);
CREATE VIRTUAL TABLE instance_text USING fts5(text, tokenize = 'unicode61 remove_diacritics 2');
""",
    # 2: indexes for the C-FIND keys people query most
    """
CREATE INDEX patient_id_idx ON patient(PatientID);
CREATE INDEX patient_name_idx ON patient(PatientName_ci);
CREATE INDEX patient_birth_idx ON patient(PatientBirthDate);
CREATE INDEX study_patient_idx ON study(patient_id);
CREATE INDEX study_date_idx ON study(StudyDate);
CREATE INDEX study_accession_idx ON study(AccessionNumber);
CREATE INDEX study_id_idx ON study(StudyID);
CREATE INDEX series_study_idx ON series(study_id, Modality);
CREATE INDEX series_modality_idx ON series(Modality);
CREATE INDEX instance_series_idx ON instance(series_id);
CREATE INDEX instance_sop_idx ON instance(SOPInstanceUID);
""",
]
SCHEMA_VERSION = len(MIGRATIONS)
