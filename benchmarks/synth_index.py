#!/usr/bin/env python3
"""Synthesize a large dtools index straight into SQLite, for query benchmarks.

    python benchmarks/synth_index.py OUT.db --instances 1000000

The rows go in through dtools' own schema and migrations, with the counts that dindex
would compute. 5 instances per series, 4 series per study, 2.5 studies per patient.
Paths point at files that do not exist; the benchmark only queries.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dtools.index.db import open_index  # noqa: E402

SURNAMES = ["SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS", "MARTIN", "MÜLLER",
            "SCHMIDT", "SCHNEIDER", "ROSSI", "RUSSO", "DUBOIS", "MOREAU", "SILVA", "SANTOS", "KOWALSKI", "NOWAK",
            "TANAKA", "SUZUKI", "WANG", "LI", "ZHANG", "KIM", "LEE", "PARK", "NGUYEN", "TRAN", "IVANOV", "PETROV"]
GIVEN = ["JOHN", "MARY", "ANNA", "PETER", "LUCAS", "EMMA", "NOAH", "OLIVIA", "LIAM", "SOFIA", "YUKI", "MIN", "JAN"]
MODALITIES = ["CT", "MR", "CR", "US", "DX", "MG", "PT", "NM"]
BODY = ["CHEST", "HEAD", "ABDOMEN", "PELVIS", "KNEE", "SPINE", "BREAST", "HAND"]
WORDS = ["CONTRAST", "FOLLOW UP", "TRAUMA", "ROUTINE", "ONCOLOGY", "ANGIO", "SCREENING", "PRE OP", "POST OP", "STROKE"]
SERIES_PER_STUDY = 4
INSTANCES_PER_SERIES = 5
ROOT = "1.2.826.0.1.3680043.10.1234.9"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--instances", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=2026)
    args = ap.parse_args(argv)
    if os.path.exists(args.out):
        os.unlink(args.out)
    rnd = random.Random(args.seed)
    t0 = time.perf_counter()
    conn = open_index(args.out)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("PRAGMA journal_mode = OFF")
    n_series = max(1, args.instances // INSTANCES_PER_SERIES)
    n_studies = max(1, n_series // SERIES_PER_STUDY)
    n_patients = max(1, int(n_studies / 2.5))
    conn.execute("BEGIN")
    patients = []
    for p in range(n_patients):
        name = f"{rnd.choice(SURNAMES)}^{rnd.choice(GIVEN)}"
        patients.append(name)
        conn.execute(
            "INSERT INTO patient (id, patient_key, PatientName, PatientName_ci, PatientID, PatientBirthDate, PatientSex) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (p + 1, f"P{p:07d}\0", name, name.upper(), f"P{p:07d}",
             f"19{rnd.randint(30, 99)}{rnd.randint(1, 12):02d}{rnd.randint(1, 28):02d}", rnd.choice("MF")),
        )
    study_rows = []
    series_rows = []
    inst_rows = []
    text_rows = []
    iid = 0
    for s in range(n_studies):
        pid = rnd.randrange(n_patients) + 1
        date = f"{rnd.choice((2025, 2026))}{rnd.randint(1, 12):02d}{rnd.randint(1, 28):02d}"
        mods = sorted({rnd.choice(MODALITIES) for _ in range(2)})
        desc = f"{rnd.choice(MODALITIES)} {rnd.choice(BODY)} {rnd.choice(WORDS)}"
        study_rows.append((s + 1, pid, f"{ROOT}.1.{s}", date, f"{rnd.randint(7, 19):02d}{rnd.randint(0, 59):02d}00",
                           f"A{s:08d}", f"S{s}", desc, "WELBY^MARCUS", "WELBY^MARCUS", "\\".join(mods),
                           SERIES_PER_STUDY, SERIES_PER_STUDY * INSTANCES_PER_SERIES))
        for k in range(SERIES_PER_STUDY):
            se = s * SERIES_PER_STUDY + k
            mod = mods[k % len(mods)]
            body = rnd.choice(BODY)
            series_rows.append((se + 1, s + 1, f"{ROOT}.2.{se}", mod, k + 1, f"{mod} {body} {k + 1}", body, date,
                                "HOSPITAL " + str(pid % 50), INSTANCES_PER_SERIES))
            for n in range(INSTANCES_PER_SERIES):
                iid += 1
                inst_rows.append((iid, se + 1, f"{ROOT}.3.{iid}", "1.2.840.10008.5.1.4.1.1.2", n + 1,
                                  "1.2.840.10008.1.2.1", f"/synthetic/{s}/{se}/{iid}.dcm", 40000, 0))
                text_rows.append((iid, f"{patients[pid - 1]} {desc} {mod} {body} HOSPITAL {pid % 50} WELBY^MARCUS "
                                       f"{rnd.choice(WORDS)} {rnd.choice(WORDS)}"))
        if len(inst_rows) >= 50000 or s == n_studies - 1:
            conn.executemany(
                "INSERT INTO study (id, patient_id, StudyInstanceUID, StudyDate, StudyTime, AccessionNumber, StudyID, "
                "StudyDescription, ReferringPhysicianName, ReferringPhysicianName_ci, ModalitiesInStudy, "
                "NumberOfStudyRelatedSeries, NumberOfStudyRelatedInstances) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                study_rows)
            conn.executemany(
                "INSERT INTO series (id, study_id, SeriesInstanceUID, Modality, SeriesNumber, SeriesDescription, "
                "BodyPartExamined, SeriesDate, InstitutionName, NumberOfSeriesRelatedInstances) "
                "VALUES (?,?,?,?,?,?,?,?,?,?)", series_rows)
            conn.executemany(
                "INSERT INTO instance (id, series_id, SOPInstanceUID, SOPClassUID, InstanceNumber, TransferSyntaxUID, "
                "path, size, mtime_ns) VALUES (?,?,?,?,?,?,?,?,?)", inst_rows)
            conn.executemany("INSERT INTO instance_text (rowid, text) VALUES (?, ?)", text_rows)
            study_rows, series_rows, inst_rows, text_rows = [], [], [], []
    conn.execute(
        "UPDATE patient SET NumberOfPatientRelatedStudies = (SELECT count(*) FROM study WHERE patient_id = patient.id), "
        "NumberOfPatientRelatedSeries = (SELECT coalesce(sum(NumberOfStudyRelatedSeries), 0) FROM study WHERE patient_id = patient.id), "
        "NumberOfPatientRelatedInstances = (SELECT coalesce(sum(NumberOfStudyRelatedInstances), 0) FROM study WHERE patient_id = patient.id)")
    conn.execute("COMMIT")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("ANALYZE")
    conn.close()
    print(f"{iid} instances, {n_series} series, {n_studies} studies, {n_patients} patients in "
          f"{time.perf_counter() - t0:.0f} s -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
