#!/usr/bin/env python3
"""Benchmark peer catalogs against the targets of the federated search work.

    python benchmarks/bench_catalog.py [--studies 100000] [--holder-instances 1000000] [--repeat 5]

1. Search: a copy of a peer's catalog of --studies remote studies (4 series each, 2.5
   studies per patient, built by applying one complete catalog update, whose time is
   reported too), and the same rows in the local tables of the same index. p50 of the
   same queries through the one engine, in-process (as dserve calls it), over the peer's
   copy and over the local rows (the baseline: local search), and of the whole
   `dsearch --peer` and `dsearch` commands.
2. Publishing: a holder whose index has --holder-instances instances (synth_index.py:
   50,000 studies for 1,000,000), granting one peer `share`. CPU and wall time of the
   first (complete) publication, of a pass with nothing changed, and of the pass after
   100 new studies were indexed; then the receiver's apply of the complete catalog.
3. The change log's cost to indexing: the index writes of --log-files parsed headers
   (Indexer.add_header, batches as dindex commits them) with the change-log triggers and
   with them dropped, interleaved, median of --repeat.
Work files live in benchmarks/scratch/ (not committed).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SCRATCH, machine  # noqa: E402
sys.path.insert(0, str(HERE.parent))
import synth_index  # noqa: E402

BIN = Path(sys.executable).parent
QUERIES = [
    ("study", {"Modality": "CT", "StudyDate": "20260101-20260131"}),
    ("study", {"PatientName": "SMI*"}),
    ("patient", {"PatientName": "SMI*"}),
    ("study", {"PatientID": "P0012345"}),
    ("study", {"StudyDate": "20250615"}),
    ("series", {"Modality": "MR", "BodyPartExamined": "KNEE", "StudyDate": "20260301-20260331"}),
]


# -- 1. search ------------------------------------------------------------------------------
def catalog_rows(n_studies: int, seed: int = 2026):
    """Patients, studies and series like synth_index.py's, as catalog rows (version, uid, parent, values)."""
    from dtools.index.catalog import ATTRS

    rnd = random.Random(seed)
    n_patients = max(1, int(n_studies / 2.5))
    version = 0
    rows = {"patient": [], "study": [], "series": []}

    def vals(level, **kw):
        return tuple(kw.get(k) for k in ATTRS[level])

    per_patient = [0] * n_patients
    studies = []
    for s in range(n_studies):
        p = rnd.randrange(n_patients)
        per_patient[p] += 1
        date = f"{rnd.choice((2025, 2026))}{rnd.randint(1, 12):02d}{rnd.randint(1, 28):02d}"
        mods = sorted({rnd.choice(synth_index.MODALITIES) for _ in range(2)})
        studies.append((s, p, date, mods))
    names = [f"{rnd.choice(synth_index.SURNAMES)}^{rnd.choice(synth_index.GIVEN)}" for _ in range(n_patients)]
    for p in range(n_patients):
        version += 1
        rows["patient"].append((version, f"k{p:07d}", None, vals(
            "patient", PatientName=names[p], PatientID=f"P{p:07d}", PatientSex=rnd.choice("MF"),
            PatientBirthDate=f"19{rnd.randint(30, 99)}0101", NumberOfPatientRelatedStudies=per_patient[p],
            NumberOfPatientRelatedSeries=4 * per_patient[p], NumberOfPatientRelatedInstances=20 * per_patient[p])))
    root = synth_index.ROOT
    for s, p, date, mods in studies:
        version += 1
        uid = f"{root}.1.{s}"
        rows["study"].append((version, uid, f"k{p:07d}", vals(
            "study", StudyInstanceUID=uid, StudyDate=date, StudyTime="101500", AccessionNumber=f"A{s:08d}",
            StudyID=f"S{s}", StudyDescription=f"{rnd.choice(synth_index.MODALITIES)} {rnd.choice(synth_index.BODY)}",
            ReferringPhysicianName="WELBY^MARCUS", ModalitiesInStudy="\\".join(mods),
            NumberOfStudyRelatedSeries=4, NumberOfStudyRelatedInstances=20)))
        for k in range(4):
            version += 1
            mod, body = mods[k % len(mods)], rnd.choice(synth_index.BODY)
            se_uid = f"{root}.2.{s * 4 + k}"
            rows["series"].append((version, se_uid, uid, vals(
                "series", SeriesInstanceUID=se_uid, Modality=mod, SeriesNumber=k + 1,
                SeriesDescription=f"{mod} {body} {k + 1}", BodyPartExamined=body, SeriesDate=date,
                InstitutionName=f"HOSPITAL {p % 50}", NumberOfSeriesRelatedInstances=5)))
    return rows, version


def build_receiver(db: Path, n_studies: int) -> float:
    """The copy of one peer's catalog (applied as one complete update) and the same rows as local ones."""
    from dtools.index.db import open_index
    from dtools.index.peers import ATTRS, Update, apply_update, _columns, _values

    rows, through = catalog_rows(n_studies)
    conn = open_index(db)
    conn.execute("PRAGMA synchronous = OFF")
    t = time.perf_counter()
    apply_update(conn, "site-b", Update("c" * 32, 1.0, 2.0, 0, through, True, rows=rows))
    applied = time.perf_counter() - t
    # the baseline: the same rows in this site's own tables (what a local search reads)
    conn.execute("BEGIN")
    ids = {}
    for level, parent_col in (("patient", None), ("study", "patient_id"), ("series", "study_id")):
        cols = _columns(level)
        extra = ["patient_key"] if level == "patient" else [parent_col]
        sql = (f"INSERT INTO {level} ({', '.join(extra + cols)}) VALUES ({', '.join('?' * (len(cols) + 1))}) "
               "RETURNING id")
        for _v, uid, parent, values in rows[level]:
            first = uid if level == "patient" else ids[parent]
            ids[uid] = conn.execute(sql, [first, *_values(level, values)]).fetchone()[0]
        assert len(ATTRS[level]) == len(rows[level][0][3])
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()
    return applied


def search(db: Path, repeat: int) -> list[tuple]:
    from dtools.index.db import open_index
    from dtools.index.query import find, peer_scope

    conn = open_index(db, readonly=True)
    home = Path(tempfile.mkdtemp(prefix="dtools-bench-"))
    (home / "config.toml").write_text('[site]\nname = "site-a"\n[peers.site-b]\nshare = false\n')
    env = {**os.environ, "DTOOLS_HOME": str(home), "DTOOLS_INDEX_PATH": str(db)}
    out = []
    scope = peer_scope(["site-b"])
    for level, keys in QUERIES:
        res = {}
        for name, kw in (("peer", {"scope": scope}), ("local", {})):
            times, n = [], 0
            for _ in range(repeat * 5):
                t = time.perf_counter()
                n = len(list(find(conn, level, keys, **kw)))
                times.append((time.perf_counter() - t) * 1000)
            argv = [str(BIN / "dsearch"), "--level", level, *[f"{k}={v}" for k, v in keys.items()]]
            if name == "peer":
                argv += ["--peer", "site-b"]
            cli = []
            for _ in range(repeat):
                t = time.perf_counter()
                subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
                cli.append((time.perf_counter() - t) * 1000)
            res[name] = (statistics.median(times), statistics.median(cli), n)
        assert res["peer"][2] == res["local"][2], (level, keys, res)
        out.append((level, keys, res))
    conn.close()
    shutil.rmtree(home, ignore_errors=True)
    return out


# -- 2. publishing --------------------------------------------------------------------------
def make_sites(root: Path, index: Path) -> tuple[Path, Path]:
    from dtools.config import Config
    from dtools.seal.keys import format_public_identity, generate_identity

    b, a = root / "site-b", root / "site-a"
    for h in (a, b):
        h.mkdir(mode=0o700, parents=True)
    ib, ia = generate_identity(Config(b), "site-b"), generate_identity(Config(a), "site-a")
    (b / "config.toml").write_text(f'[site]\nname = "site-b"\n[peers.site-a]\nidentity = '
                                   f'"{format_public_identity(ia.public())}"\nshare = true\n')
    (a / "config.toml").write_text(f'[site]\nname = "site-a"\n[peers.site-b]\nidentity = '
                                   f'"{format_public_identity(ib.public())}"\n')
    shutil.copyfile(index, b / "index.db")
    return a, b


def timed_publish(home: Path) -> tuple[float, float, list[dict]]:
    from dtools.config import Config
    from dtools.exchange.ledger import Ledger, ledger_path
    from dtools.remote.catalog import publish_catalog

    t, c = time.perf_counter(), time.process_time()
    ledger = Ledger(ledger_path(home))
    try:
        recs = publish_catalog(Config(home), ledger)
    finally:
        ledger.close()
    return time.perf_counter() - t, time.process_time() - c, recs


def add_studies(home: Path, work: Path, n: int) -> None:
    from dtools.index.db import open_index
    from dtools.index.ingest import Indexer
    from dtools.sample import make_instance

    conn = open_index(home / "index.db")
    with Indexer(conn) as ix:
        for s in range(n):
            for se in range(2):
                ds = make_instance("CT", 900000 + s, 900000 + s, se, 0)
                p = work / f"new{s}-{se}.dcm"
                ds.save_as(p, enforce_file_format=True)
                ix.add(p)
    conn.close()


def publishing(instances: int) -> None:
    from dtools.config import Config
    from dtools.seal.keys import load_identity, load_peers
    from dtools.seal.opening import Opener

    src = SCRATCH / f"synth-{instances}.db"
    if not src.exists():
        subprocess.run([sys.executable, str(HERE / "synth_index.py"), str(src), "--instances", str(instances)],
                       check=True)
    root = Path(tempfile.mkdtemp(prefix="dtools-bench-", dir=SCRATCH))
    try:
        a, b = make_sites(root, src)
        import sqlite3

        with sqlite3.connect(b / "index.db") as db:
            n_studies = db.execute("SELECT count(*) FROM study").fetchone()[0]
        wall, cpu, recs = timed_publish(b)
        (full,) = recs
        print(f"\npublishing the catalog of {n_studies} studies (load average {os.getloadavg()[0]:.1f}):")
        print(f"  first, complete: {wall:6.2f} s wall, {cpu:6.2f} s CPU  ({full['catalog']['rows']} rows, "
              f"{full['bytes'] / 1e6:.1f} MB sealed)  target <= 60 s")
        wall, cpu, recs = timed_publish(b)
        assert recs == []
        print(f"  nothing changed: {wall:6.3f} s wall, {cpu:6.3f} s CPU")
        add_studies(b, root, 100)
        wall, cpu, recs = timed_publish(b)
        (inc,) = recs
        print(f"  after 100 new studies: {wall:6.3f} s wall, {cpu:6.3f} s CPU  ({inc['catalog']['rows']} rows) "
              f"target <= 2 s CPU")
        config = Config(a)
        opener = Opener(config, load_identity(config), load_peers(config))
        t = time.perf_counter()
        got = opener.open(Path(full["path"]), record=True)
        opener.close()
        print(f"  receiver applies the complete catalog: {time.perf_counter() - t:6.2f} s ({got.catalog.rows} rows)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


# -- 3. the change log's cost to indexing ----------------------------------------------------
def change_log_cost(n_files: int, repeat: int) -> None:
    from dtools.dicom.header import read_header
    from dtools.index.db import open_index
    from dtools.index.ingest import INDEX_KEYS, Indexer
    from dtools.sample import make_instance

    work = Path(tempfile.mkdtemp(prefix="dtools-bench-", dir=SCRATCH))
    try:
        headers = []
        for i in range(n_files):
            study, k = divmod(i, 50)
            ds = make_instance("CT" if study % 2 == 0 else "MR", study % 40, study, k // 10, k % 10)
            p = work / f"{i}.dcm"
            ds.save_as(p, enforce_file_format=True)
            headers.append((str(p), p.stat().st_size, read_header(p, p.stat().st_size, INDEX_KEYS)))
        times: dict[bool, list[float]] = {True: [], False: []}
        for r in range(repeat):
            for triggers in (True, False):
                db = work / f"index-{r}-{triggers}.db"
                conn = open_index(db)
                if not triggers:
                    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
                        conn.execute(f"DROP TRIGGER {name}")
                t = time.perf_counter()
                ix = Indexer(conn)
                for j, (path, size, header) in enumerate(headers):
                    ix.add_header(path, size, 0, header)
                    if j % 500 == 499:
                        ix.flush()
                ix.flush()
                times[triggers].append(time.perf_counter() - t)
                conn.close()
        on, off = statistics.median(times[True]), statistics.median(times[False])
        print(f"\nindex writes of {n_files} files (load average {os.getloadavg()[0]:.1f}): with the change log "
              f"{on:.2f} s, without {off:.2f} s ({(on / off - 1) * 100:+.1f}%)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=100_000, help="remote studies in the searched copy (0: skip)")
    ap.add_argument("--holder-instances", type=int, default=1_000_000, help="the publishing site's index (0: skip)")
    ap.add_argument("--log-files", type=int, default=5000, help="files for the change log's cost (0: skip)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args(argv)
    SCRATCH.mkdir(exist_ok=True)
    print(f"machine: {machine()}")
    if args.studies:
        db = SCRATCH / f"catalog-copy-{args.studies}.db"
        if not db.exists():
            tmp = db.with_suffix(".tmp")
            for suffix in ("", "-wal", "-shm"):
                Path(f"{tmp}{suffix}").unlink(missing_ok=True)
            secs = build_receiver(tmp, args.studies)
            os.replace(tmp, db)
            print(f"applied a complete catalog of {args.studies} studies in {secs:.1f} s")
        print(f"\nsearch over a peer's catalog of {args.studies} studies (load average {os.getloadavg()[0]:.1f}); "
              "p50 ms: engine peer / engine local, command peer / command local, matches")
        for level, keys, res in search(db, args.repeat):
            q = f"--level {level} " + " ".join(f"{k}={v}" for k, v in keys.items())
            print(f"  {q:62s} {res['peer'][0]:6.1f} / {res['local'][0]:6.1f}   "
                  f"{res['peer'][1]:6.0f} / {res['local'][1]:6.0f}   {res['peer'][2]:6d}")
    if args.holder_instances:
        publishing(args.holder_instances)
    if args.log_files:
        change_log_cost(args.log_files, args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
