"""danon: write de-identified copies of DICOM files for research exports (PS3.15 Annex E).

    dsearch --level instance Modality=MR | danon --out /exports/mr | dseal --to research

Worker processes read, de-identify and stage each copy; a committer thread of this
process makes each batch durable, records its pseudonyms in the mapping table and
renames the copies into place while the workers go on; only then does the main thread
print their records.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path

import click
from pydicom.datadict import tag_for_keyword

from .. import cli
from ..anon.deid import Deidentifier
from ..anon.files import STAGING, Written, deidentify_file, remove_temporaries, staging_dir, sync_tree
from ..anon.mapping import FILE as MAPPING_FILE
from ..anon.mapping import Mapping
from ..anon.profile import Options, Profile, keep_tags, load_table
from ..anon.pseudo import Keyring, load_keyring
from ..config import SUBDIRS
from ..errors import InputError, TempFailure, UsageError
from ..workers import Chunks, worker_init
from .dindex import IDLE, Walker, _stdin_records

CHUNK = 32  # files per task sent to a worker
BATCH = 500  # files made durable and printed together
BATCH_SECONDS = 1.0  # ... or after this long

# -- worker side ---------------------------------------------------------------------
_STATE: tuple | None = None


def _init(parent: int, profile: Profile, key: bytes, out: str, allow_burned_in: bool) -> None:
    worker_init(parent)
    _setup(parent, profile, key, out, allow_burned_in)


def _setup(parent: int, profile: Profile, key: bytes, out: str, allow_burned_in: bool) -> None:
    import logging

    logging.getLogger("pydicom").setLevel(logging.CRITICAL)  # its messages may quote patient data
    global _STATE
    _STATE = (Deidentifier(profile, Keyring(key)), out, parent, allow_burned_in)


def _chunk(paths: list[str]) -> list:
    assert _STATE is not None
    deid, out, parent, allow = _STATE
    results: list = []
    for path in paths:
        try:
            results.append(deidentify_file(path, deid, out, parent, allow))
        except InputError as exc:
            results.append(exc)
        except OSError as exc:  # the output side (disk full, permissions): the run stops
            results.append(TempFailure(f"{out}: cannot write ({exc.strerror or exc}); free space or fix "
                                       "permissions, then run again"))
    return results


# -- the run -------------------------------------------------------------------------
class Run:
    def __init__(self, app: cli.App, out: Path, mapping: Mapping, keyring: Keyring, init_args: tuple, jobs: int):
        self.app = app
        self.out = out
        self.mapping = mapping
        self.keyring = keyring
        self.init_args = init_args
        self.jobs = jobs
        self.chunks = Chunks(jobs, _init, init_args)
        self.pending: list[str] = []
        self.waiting: set[str] = set()  # offered and not yet staged: the same path twice is done once
        self.batch: list[tuple[str, Written]] = []
        self.batch_started = time.monotonic()
        self.written = self.duplicates = self.no_patient_id = 0
        self.advance = lambda n=1, total=None: None
        self.handed: queue.Queue = queue.Queue(maxsize=2)  # batches for the committer
        self.ready: queue.Queue = queue.Queue()  # what it has put in place, to print
        self.committer: threading.Thread | None = None
        self.error: BaseException | None = None
        self.stopping = False
        if jobs == 1:
            _setup(*init_args)

    def offer(self, path: str) -> None:
        if path in self.waiting:
            return
        self.waiting.add(path)
        self.pending.append(path)
        if len(self.pending) >= CHUNK:
            self._dispatch()

    def _dispatch(self) -> None:
        items, self.pending = self.pending, []
        if not items:
            return
        self.chunks.submit(_chunk, items, items)
        while self.chunks.full:
            self._collect_one()

    def _collect_one(self) -> None:
        items, results = self.chunks.next()
        for path, result in zip(items, results):
            self.advance()
            self.waiting.discard(path)
            if isinstance(result, TempFailure):
                raise result
            if isinstance(result, InputError):
                self.app.fail(path, str(result))
                continue
            self.batch.append((path, result))
        if len(self.batch) >= BATCH or time.monotonic() - self.batch_started >= BATCH_SECONDS:
            self.commit()
        self._print_ready()

    def drain(self) -> None:
        """Everything offered so far is in place and printed (or failed) when this returns."""
        self._dispatch()
        while self.chunks:
            self._collect_one()
        self.commit()
        self.handed.join()
        self._check()
        self._print_ready()

    def commit(self) -> None:
        """Hand the batch to the committer thread, so that the workers get new files while it syncs."""
        batch, self.batch = self.batch, []
        self.batch_started = time.monotonic()
        if not batch:
            return
        self._check()
        if self.committer is None:
            self.committer = threading.Thread(target=self._commit_loop, name="danon-commit", daemon=True)
            self.committer.start()
        self.handed.put(batch)  # waits while two batches are already waiting: the workers slow down

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _commit_loop(self) -> None:
        while True:
            batch = self.handed.get()
            try:
                if batch is None:
                    return
                if self.error is None and not self.stopping:
                    self._commit(batch)
            except BaseException as exc:  # re-raised in the main thread
                self.error = exc
            finally:
                self.handed.task_done()

    def _commit(self, batch: list[tuple[str, Written]]) -> None:
        """Durable copies, then their pseudonyms in the mapping, then the names, then the records."""
        try:
            sync_tree(self.out, [w.tmp for _p, w in batch])
            rows = list(dict.fromkeys(row for _p, w in batch for row in w.rows))
            first = self.mapping.add(self.keyring.key_id, rows, [w.record["SOPInstanceUID"] for _p, w in batch])
            placed = []
            out: list[tuple[str, object]] = []
            made: set[str] = set()
            for (path, w), new in zip(batch, first):
                if not new:
                    os.unlink(w.tmp)
                    self.duplicates += 1
                    out.append(("note", f"{path}: the same SOP instance as an earlier input; its copy is written once"))
                    continue
                parent = os.path.dirname(w.target)
                if parent not in made:
                    os.makedirs(parent, exist_ok=True)
                    made.add(parent)
                os.replace(w.tmp, w.target)
                placed.append(w)
                if w.basis != "id":
                    self.no_patient_id += 1
            sync_tree(self.out, [w.target for w in placed])
        except OSError as exc:
            raise TempFailure(f"{self.out}: cannot write ({exc.strerror or exc}); free space or fix permissions, "
                              "then run again") from None
        out.extend(("record", w.record) for w in placed)
        self.ready.put(out)

    def _print_ready(self) -> None:
        """Print what the committer has put in place. Only the main thread writes to stdout, so
        that a reader that stops reading cannot hold up Ctrl-C or SIGTERM."""
        while True:
            try:
                items = self.ready.get_nowait()
            except queue.Empty:
                return
            for what, item in items:
                if what == "record":
                    self.written += 1
                    self.app.emit(item)
                else:
                    self.app.info(item)

    def close(self) -> None:
        """Stop the workers and the committer; a batch being committed is finished, the others'
        temporary files are left for the caller to remove."""
        self.stopping = True
        self.chunks.close()
        if self.committer is not None:
            self.handed.put(None)
            self.committer.join()
            self.committer = None


def _check_out(app: cli.App, out_arg: str) -> Path:
    out = Path(out_arg).expanduser().absolute()
    real = Path(os.path.realpath(out))
    home = Path(os.path.realpath(app.home))
    inside = [home / d for d in SUBDIRS if real == home / d or home / d in real.parents]
    if real == home or inside:
        where = inside[0] if inside else home
        raise UsageError(f"--out {out_arg} is inside {where}, where the site keeps its own data; de-identified "
                         "copies must not mix with it: choose a directory outside the home's archive, keys, "
                         "inbox, outbox and spool")
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging_dir(out)
    except OSError as exc:
        raise UsageError(f"--out {out_arg}: cannot create ({exc.strerror}); check the path and its permissions") from None
    return out


@cli.command("danon", help="""Write de-identified copies of DICOM files for research exports.

PATHs are files or directories (searched recursively). With no PATH, paths or NDJSON
records carrying "path" (from dsearch --level instance) are read from standard input.
Each file is copied to --out DIR in the archive layout of its new UIDs, de-identified by the
DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile; originals are never
changed. One instance record is printed per copy, with its new path and UIDs. Pseudonyms
are stable: the same patient, study, series and instance always get the same ones under
the site's key (HOME/keys/anon.key), and HOME/anon.db maps them back.""")
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--out", "out", default=None, metavar="DIR",
              help="Directory for the copies, OUT/<Study>/<Series>/<SOP>.dcm (required); not inside the home's "
                   "archive.")
@click.option("--retain-longitudinal", is_flag=True,
              help="Shift dates by a per-patient offset instead of removing them (intervals survive).")
@click.option("--retain-uids", is_flag=True, help="Keep the original UIDs (off by default: they are replaced).")
@click.option("--clean-descriptions", is_flag=True,
              help="Keep descriptions and comments, with this file's identifying values and dates taken out.")
@click.option("--keep", "keep", multiple=True, metavar="KEYWORD",
              help="Keep this attribute as it is (repeat for several), e.g. --keep PatientAge.")
@click.option("--salt", "salt", metavar="FILE", default=None,
              help="Use the key in FILE instead of the site's (another project, other pseudonyms).")
@click.option("--allow-burned-in", is_flag=True,
              help="Copy files that may have patient data burned into their pixels (BurnedInAnnotation, SC, US).")
@cli.null_option
@click.option("-j", "--jobs", type=click.IntRange(1, 64), default=None, metavar="N",
              help="Worker processes [default: number of CPUs].")
def danon(app: cli.App, paths, out, retain_longitudinal, retain_uids, clean_descriptions, keep, salt,
          allow_burned_in, null, jobs):
    if not out:
        raise UsageError("say where the de-identified copies go: --out DIR")
    options = Options(retain_uids=retain_uids, retain_longitudinal=retain_longitudinal,
                      clean_descriptions=clean_descriptions, keep=keep_tags(keep))
    table = load_table()
    profile = Profile.build(table, options)
    for kw in keep:
        code = table.code(tag_for_keyword(kw.strip()) or 0)
        if code is not None:
            app.err(f"warning: --keep {kw} keeps an attribute the profile would {_VERB.get(code[0], 'change')}; "
                    "make sure the study protocol allows it")
    app.config.ensure_home()
    out_dir = _check_out(app, out)
    keyring = load_keyring(app.config, salt, warn=app.err)
    if remove_temporaries(out_dir):
        app.log.info("removed temporaries left in %s by a killed run", out_dir)
    mapping = Mapping(app.home / MAPPING_FILE)
    jobs = jobs or os.cpu_count() or 1
    run = Run(app, out_dir, mapping, keyring, (os.getpid(), profile, keyring.key, str(out_dir), allow_burned_in), jobs)
    real_out = os.path.realpath(out_dir) + os.sep
    walker = Walker(app)

    def offer_tree(top: str) -> None:
        # the files under --out are copies: skip them (one realpath per argument, not per file)
        real_top = os.path.realpath(top)
        for path, _st in walker.walk(top):
            real = real_top + path[len(top):]
            if (real + os.sep).startswith(real_out):
                if path == top:  # named explicitly: say why it is skipped
                    app.fail(path, f"is inside --out {out}; a copy is not de-identified again")
                continue
            run.offer(path)

    try:
        with app.progress("de-identifying", None) as advance:
            run.advance = advance
            if paths:
                for top in paths:
                    offer_tree(os.path.abspath(top))
            else:
                for item in _stdin_records(app, null):
                    if item is IDLE:
                        run.drain()
                        continue
                    path = item.get("path") if isinstance(item, dict) else None
                    if not isinstance(path, str) or not path:
                        kind = item.get("kind", "record") if isinstance(item, dict) else "record"
                        app.fail(f"{kind} record", "has no \"path\"; give files, or search with "
                                                   "'dsearch --level instance'")
                        continue
                    offer_tree(os.path.abspath(os.path.expanduser(path)))
            run.drain()
    finally:
        run.close()
        remove_temporaries(out_dir, os.getpid())
        _remove_empty_staging(out_dir)
        mapping.close()
    summary = f"de-identified {run.written} file(s) into {out_dir}"
    if run.duplicates:
        summary += f", {run.duplicates} duplicate(s) written once"
    summary += f", failed {app.failures}"
    app.info(summary)
    if run.no_patient_id:
        app.info(f"{run.no_patient_id} file(s) had no PatientID: their patient pseudonym comes from the patient's "
                 "name and birth date (or, without those, from the study)")


_VERB = {"X": "remove", "Z": "empty", "D": "replace", "U": "replace", "C": "clean", "K": "keep"}


def _remove_empty_staging(out: Path) -> None:
    try:
        os.rmdir(out / STAGING)
    except OSError:
        pass  # another run is using it, or it holds a killed run's temporaries


main = cli.entry(danon)

if __name__ == "__main__":
    cli.run(danon)
