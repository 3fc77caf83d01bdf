"""dindex and dsearch as a user runs them: installed scripts, real pipes, bad input, kills."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import orjson
import pydicom
import pytest

from conftest import cmd_path, run
from dtools.commands import dindex as dindex_cmd
from dtools.commands import dsearch as dsearch_cmd
from dtools.sample import generate, make_instance

DATA = Path(os.path.dirname(pydicom.data.__file__))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus")
    generate(d, studies=8, series=2, instances=3)
    return d


def env_for(home: Path) -> dict:
    return {"DTOOLS_HOME": str(home)}


def db_rows(home: Path, sql: str):
    conn = sqlite3.connect(home / "index.db")
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_index_then_search_through_pipes(corpus, tmp_path):
    home = tmp_path / "h"
    r = run("dindex", str(corpus), env=env_for(home))
    assert r.returncode == 0, r.stderr
    recs = r.records
    assert len(recs) == 48 and all(x["kind"] == "instance" and os.path.isabs(x["path"]) for x in recs)
    assert "indexed 48, unchanged 0, failed 0" in r.stderr
    r = run("dsearch", "--level", "study", "--fields", "PatientName,StudyDate", env=env_for(home))
    assert r.returncode == 0 and len(r.records) == 8
    names = {x["PatientName"] for x in r.records}
    assert "Yamada^Tarou=山田^太郎=やまだ^たろう" in names and "Hong^Gildong=洪^吉洞=홍^길동" in names
    # searchable as Unicode, by name and by free text
    r = run("dsearch", "-L", "patient", "PatientName=*иванов*", env=env_for(home))
    assert [x["PatientID"] for x in r.records] == ["PID00002"]
    r = run("dsearch", "-L", "study", "山田", env=env_for(home))
    assert len(r.records) == 1 and r.records[0]["PatientID"] == "PID00004"
    r = run("dsearch", "--count", "Modality=CT", env=env_for(home))
    assert r.stdout.strip() == b"24"


def test_rescan_skips_unchanged_and_reindexes_changed(corpus, tmp_path):
    home = tmp_path / "h"
    tree = tmp_path / "tree"
    shutil.copytree(corpus, tree)
    assert run("dindex", "-q", str(tree), env=env_for(home)).returncode == 0
    r = run("dindex", str(tree), env=env_for(home))
    assert r.returncode == 0 and r.records == [] and "indexed 0, unchanged 48" in r.stderr
    victim = next(tree.rglob("*.dcm"))
    ds = pydicom.dcmread(victim)
    ds.StudyDescription = "CHANGED DESCRIPTION"
    ds.save_as(victim)
    r = run("dindex", str(tree), env=env_for(home))
    assert "indexed 1, unchanged 47" in r.stderr
    assert len(r.records) == 1 and r.records[0]["StudyDescription"] == "CHANGED DESCRIPTION"
    assert db_rows(home, "SELECT count(*) FROM instance") == [(48,)]


def test_prune_removes_missing_files_and_empty_levels(corpus, tmp_path):
    home = tmp_path / "h"
    tree = tmp_path / "tree"
    shutil.copytree(corpus, tree)
    run("dindex", "-q", str(tree), env=env_for(home))
    shutil.rmtree(tree / "study001")
    r = run("dindex", "--prune", str(tree), env=env_for(home))
    assert r.returncode == 0 and "pruned 6" in r.stderr
    assert db_rows(home, "SELECT count(*) FROM instance") == [(42,)]
    assert db_rows(home, "SELECT count(*) FROM study") == [(7,)]
    assert db_rows(home, "SELECT count(*) FROM instance_text") == [(42,)]


def test_duplicate_sop_uid_is_reported_and_both_kept(corpus, tmp_path):
    home = tmp_path / "h"
    one = next(corpus.rglob("*.dcm"))
    (tmp_path / "copy").mkdir()
    shutil.copy(one, tmp_path / "copy" / "same.dcm")
    r = run("dindex", str(one), str(tmp_path / "copy"), env=env_for(home))
    assert r.returncode == 0
    assert "same SOPInstanceUID" in r.stderr and "both are kept" in r.stderr
    assert db_rows(home, "SELECT count(*) FROM instance") == [(2,)]
    assert db_rows(home, "SELECT NumberOfSeriesRelatedInstances FROM series") == [(1,)]


def test_bad_inputs_each_get_one_line(corpus, tmp_path):
    home = tmp_path / "h"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("not dicom\n")
    good = next(corpus.rglob("*.dcm"))
    whole = good.read_bytes()
    (bad / "truncated.dcm").write_bytes(whole[: len(whole) // 2])
    ds = pydicom.dcmread(good)
    del ds.StudyInstanceUID
    ds.save_as(bad / "nostudy.dcm")
    (bad / "dangling.dcm").symlink_to(bad / "gone.dcm")
    (bad / "loop").symlink_to(bad)
    shutil.copy(good, bad / "good.dcm")
    r = run("dindex", str(bad), env=env_for(home))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert any("notes.txt: not a DICOM file" in l for l in lines)
    assert any("truncated.dcm: truncated DICOM file" in l for l in lines)
    assert any("nostudy.dcm: no StudyInstanceUID; not indexed" in l for l in lines)
    assert any("dangling.dcm: cannot stat" in l for l in lines)
    assert any("directory loop" in l for l in lines)
    assert "failed 5" in lines[-1]
    assert [x["path"] for x in r.records] == [str(bad / "good.dcm")]
    # nothing half-written for the failures
    assert db_rows(home, "SELECT count(*) FROM instance") == [(1,)]
    assert db_rows(home, "SELECT count(*) FROM study") == [(1,)]


def test_pydicom_corpus_indexes_without_traceback(tmp_path):
    home = tmp_path / "h"
    r = run("dindex", str(DATA / "test_files"), str(DATA / "charset_files"), env=env_for(home))
    assert r.returncode == 1  # the corpus holds deliberately broken files
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr
    assert len(r.records) > 60
    failed = [l for l in r.stderr.splitlines() if ": " in l and "failed" not in l]
    assert all(l.startswith("dindex: ") for l in failed)


def test_paths_on_stdin_nul_and_records(corpus, tmp_path):
    home = tmp_path / "h"
    find = subprocess.run(["find", str(corpus), "-name", "*.dcm", "-print0"], capture_output=True, check=True)
    r = run("dindex", "-0", input=find.stdout, env=env_for(home))
    assert r.returncode == 0 and len(r.records) == 48
    # records from an earlier step pass through, extra fields kept, even when unchanged
    lines = b"".join(orjson.dumps({"kind": "instance", "path": x["path"], "envelope_id": "ab12", "peer": "site-a"}) + b"\n"
                     for x in r.records[:3])
    r2 = run("dindex", input=lines, env=env_for(home))
    assert r2.returncode == 0 and len(r2.records) == 3
    assert all(x["envelope_id"] == "ab12" and x["peer"] == "site-a" and x["StudyInstanceUID"] for x in r2.records)
    r3 = run("dindex", input=b"{broken json\n", env=env_for(home))
    assert r3.returncode == 1 and "not a valid JSON record" in r3.stderr


def test_search_pipes_into_index(corpus, tmp_path):
    home = tmp_path / "h"
    run("dindex", "-q", str(corpus), env=env_for(home))
    s = run("dsearch", "Modality=MR", env=env_for(home))
    r = run("dindex", input=s.stdout, env=env_for(home))
    assert len(r.records) == 24 and "unchanged 24" in r.stderr


def test_usage_errors_exit_2_with_help(corpus, tmp_path):
    home = tmp_path / "h"
    run("dindex", "-q", str(corpus), env=env_for(home))
    for args, needle in [
        (["Bogus=1"], "unknown keyword 'Bogus'"),
        (["StudyDate=2026-01"], "dates are YYYYMMDD"),
        (["--level", "frame"], "Invalid value for '-L' / '--level'"),
        (['"open'], "--quote"),
        (["--fields", "Nope"], "unknown field"),
    ]:
        r = run("dsearch", *args, env=env_for(home))
        assert r.returncode == 2, (args, r.stderr)
        assert needle in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    r = run("dsearch", "--quote", '"open', env=env_for(home))
    assert r.returncode == 0


def test_search_without_index_says_what_to_do(tmp_path):
    r = run("dsearch", "PatientID=1", env=env_for(tmp_path / "empty"))
    assert r.returncode == 2 and "run 'dindex PATH...' first" in r.stderr


def test_closed_pipe_is_quiet(corpus, tmp_path):
    home = tmp_path / "h"
    run("dindex", "-q", str(corpus), env=env_for(home))
    p = subprocess.run(f"'{cmd_path('dsearch')}' | head -1", shell=True, capture_output=True,
                       env={**os.environ, "DTOOLS_HOME": str(home)}, timeout=60)
    assert len(p.stdout.splitlines()) == 1 and p.stderr == b""


def test_stdin_records_stream_before_eof(corpus, tmp_path):
    """A slow producer's records come out before it closes the pipe (idle commit)."""
    home = tmp_path / "h"
    first = next(corpus.rglob("*.dcm"))
    proc = subprocess.Popen([cmd_path("dindex")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "DTOOLS_HOME": str(home)})
    try:
        proc.stdin.write(f"{first}\n".encode())
        proc.stdin.flush()
        line = proc.stdout.readline()  # blocks until dindex commits and emits
        assert orjson.loads(line)["path"] == str(first)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
    assert proc.returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_run_loses_and_duplicates_nothing(tmp_path, sig):
    home = tmp_path / "h"
    tree = tmp_path / "tree"
    n_files = 0
    for s in range(40):
        for i in range(50):
            ds = make_instance("CT", s, s, 0, i)
            p = tree / f"s{s:02d}" / f"{i:03d}.dcm"
            p.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(p, enforce_file_format=True)
            n_files += 1
    env = {**os.environ, "DTOOLS_HOME": str(home)}
    kills = 0
    for attempt in range(4):
        proc = subprocess.Popen([cmd_path("dindex"), "-q", "--jobs", "2", str(tree)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.35 + 0.1 * attempt)
        if proc.poll() is None:
            proc.send_signal(sig)
            kills += 1
        _, err = proc.communicate(timeout=60)
        assert b"Traceback" not in err
        if sig == signal.SIGTERM and proc.returncode == 143:
            assert b"dindex: terminated" in err
        else:  # finished, killed, or terminated during interpreter start-up (before any work)
            assert proc.returncode in (0, -sig), err.decode("utf-8", "replace")
    r = run("dindex", str(tree), env={"DTOOLS_HOME": str(home)})
    assert r.returncode == 0
    assert db_rows(home, "SELECT count(*), count(DISTINCT path), count(DISTINCT SOPInstanceUID) FROM instance") == [
        (n_files, n_files, n_files)
    ]
    assert db_rows(home, "SELECT count(*) FROM instance_text") == [(n_files,)]
    assert db_rows(home, "SELECT sum(NumberOfStudyRelatedInstances) FROM study") == [(n_files,)]
    assert kills >= 1


def test_in_process_main(invoke, home, corpus):
    r = invoke(dindex_cmd.main, ["-q", str(corpus)])
    # -q quiets stderr only: every indexed file still gets its record
    assert r.returncode == 0 and r.stderr == "" and len(r.records) == sum(1 for _ in corpus.rglob("*.dcm"))
    r = invoke(dsearch_cmd.main, ["--level", "series", "Modality=CT", "--fields", "SeriesInstanceUID"])
    assert r.returncode == 0 and len(r.records) == 8
    r = invoke(dsearch_cmd.main, ["--table", "-L", "study"])
    assert r.returncode == 0 and "PatientName" in r.stdout.decode()


def test_progress_bar_only_on_a_terminal(corpus, tmp_path):
    import pty

    env = {**os.environ, "DTOOLS_HOME": str(tmp_path / "h"), "COLUMNS": "100"}
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([cmd_path("dindex"), str(corpus)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=slave, env=env)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # the pty closes when dindex exits
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(timeout=60)
    finally:
        os.close(master)
    shown = b"".join(chunks).decode("utf-8", "replace")
    assert "indexing" in shown and "indexed 48" in shown
    piped = run("dindex", str(corpus), env={"DTOOLS_HOME": str(tmp_path / "h2")})
    assert "indexing" not in piped.stderr and "\x1b[" not in piped.stderr


def test_same_file_given_twice_is_indexed_once(corpus, tmp_path):
    one = next(corpus.rglob("*.dcm"))
    r = run("dindex", str(one), str(one), str(one.parent), env=env_for(tmp_path / "h"))
    assert r.returncode == 0, r.stderr
    assert "same SOPInstanceUID" not in r.stderr
    assert [x["path"] for x in r.records].count(str(one)) == 1
    assert db_rows(tmp_path / "h", "SELECT count(*) FROM instance_text") == [(3,)]
