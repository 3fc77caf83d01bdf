"""What the index stores at each level, and the versioned migrations that build it.

Each level keeps the attributes C-FIND returns there; every other text attribute goes
into the FTS5 table ``instance_text`` (rowid = instance id) for free text. Peers' catalogs
(their patients, studies and series) live in ``peer_*`` tables with the same columns, apart
from this site's own archive.
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

# A peer's catalog: the levels above instance, in tables of their own (see migration 3).
CATALOG_LEVELS = ("patient", "study", "series")
PEER_TABLE = {"patient": "peer_patient", "study": "peer_study", "series": "peer_series"}
# the key that tells rows of a level apart in the local index (the change log's key)
LOCAL_KEY = {"patient": "patient_key", "study": "StudyInstanceUID", "series": "SeriesInstanceUID"}


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


def _change_log_triggers(level: str) -> str:
    """Triggers that note every patient, study or series row written or deleted in the
    change log, so that publishing the catalog reads only what changed. (Conflict clauses
    inside a trigger give way to the outer statement's: delete, then insert.)"""
    key = LOCAL_KEY[level]
    return f"""
CREATE TRIGGER {level}_changed_insert AFTER INSERT ON {level} BEGIN
  DELETE FROM catalog_changes WHERE level = '{level}' AND key = NEW.{key};
  INSERT INTO catalog_changes (level, key) VALUES ('{level}', NEW.{key});
END;
CREATE TRIGGER {level}_changed_update AFTER UPDATE ON {level} BEGIN
  DELETE FROM catalog_changes WHERE level = '{level}' AND key IN (NEW.{key}, OLD.{key});
  INSERT INTO catalog_changes (level, key) VALUES ('{level}', NEW.{key});
  INSERT INTO catalog_changes (level, key) SELECT '{level}', OLD.{key} WHERE OLD.{key} IS NOT NEW.{key};
END;
CREATE TRIGGER {level}_changed_delete AFTER DELETE ON {level} BEGIN
  DELETE FROM catalog_changes WHERE level = '{level}' AND key = OLD.{key};
  INSERT INTO catalog_changes (level, key) VALUES ('{level}', OLD.{key});
END;
"""


MIGRATIONS.append(
    # 3: peers' catalogs, kept apart from this site's archive, and the change log that
    # lets this site publish its own catalog incrementally. The peer leads the indexes of
    # the keys people query, so that the peer filter costs no row reads.
    f"""
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta (name, value) VALUES ('index_id', lower(hex(randomblob(16))));
CREATE TABLE catalog_changes (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  level TEXT NOT NULL,
  key TEXT NOT NULL
);
CREATE UNIQUE INDEX catalog_changes_key ON catalog_changes(level, key);
{_change_log_triggers("patient")}
{_change_log_triggers("study")}
{_change_log_triggers("series")}
CREATE TABLE peer_catalog (
  peer TEXT PRIMARY KEY,
  catalog_id TEXT NOT NULL,
  created_at REAL NOT NULL,
  through INTEGER NOT NULL DEFAULT 0,
  floor INTEGER NOT NULL DEFAULT 0,
  generated_at REAL,
  updated_at REAL NOT NULL
);
CREATE TABLE peer_patient (
  id INTEGER PRIMARY KEY,
  peer TEXT NOT NULL,
  uid TEXT NOT NULL,
  version INTEGER NOT NULL,
  {_columns("patient")}
);
CREATE UNIQUE INDEX peer_patient_uid ON peer_patient(peer, uid);
CREATE TABLE peer_study (
  id INTEGER PRIMARY KEY,
  peer TEXT NOT NULL,
  patient_uid TEXT NOT NULL,
  patient_id INTEGER,
  version INTEGER NOT NULL,
  {_columns("study")}
);
CREATE UNIQUE INDEX peer_study_uid ON peer_study(peer, StudyInstanceUID);
CREATE TABLE peer_series (
  id INTEGER PRIMARY KEY,
  peer TEXT NOT NULL,
  study_uid TEXT NOT NULL,
  study_id INTEGER,
  version INTEGER NOT NULL,
  {_columns("series")}
);
CREATE UNIQUE INDEX peer_series_uid ON peer_series(peer, SeriesInstanceUID);
CREATE TABLE peer_removed (
  peer TEXT NOT NULL,
  level TEXT NOT NULL,
  uid TEXT NOT NULL,
  version INTEGER NOT NULL,
  PRIMARY KEY (peer, level, uid)
) WITHOUT ROWID;
CREATE INDEX peer_patient_id_idx ON peer_patient(peer, PatientID);
CREATE INDEX peer_patient_name_idx ON peer_patient(peer, PatientName_ci);
CREATE INDEX peer_patient_birth_idx ON peer_patient(peer, PatientBirthDate);
CREATE INDEX peer_study_patient_idx ON peer_study(patient_id);
CREATE INDEX peer_study_date_idx ON peer_study(peer, StudyDate);
CREATE INDEX peer_study_accession_idx ON peer_study(peer, AccessionNumber);
CREATE INDEX peer_study_id_idx ON peer_study(peer, StudyID);
CREATE INDEX peer_series_study_idx ON peer_series(study_id, Modality);
CREATE INDEX peer_series_modality_idx ON peer_series(peer, Modality);
CREATE INDEX peer_study_orphan ON peer_study(peer, patient_uid) WHERE patient_id IS NULL;
CREATE INDEX peer_series_orphan ON peer_series(peer, study_uid) WHERE study_id IS NULL;
""")
SCHEMA_VERSION = len(MIGRATIONS)
