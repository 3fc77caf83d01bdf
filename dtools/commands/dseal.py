"""dseal: seal DICOM studies into signed, encrypted envelopes for named peers, and open them.

    dsearch --level instance ... | dseal --to site-b        # envelope records out
    dmail-recv | dseal --open | dindex                      # instance records out
    dseal keygen NAME / dseal peers
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from .. import cli
from ..errors import ConfigError, InputError, TempFailure, UsageError
from ..seal import keys
from ..seal.opening import Opener
from ..seal.sealing import GROUPS, clean_stale_envelopes, collect, read_passphrase, seal_group


class _Group(click.Group):
    """A group whose leftover arguments are envelope or DICOM paths unless they name a subcommand."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        rest = click.Command.parse_args(self, ctx, args)
        if rest and rest[0] in self.commands:
            ctx._protected_args, ctx.args = rest[:1], rest[1:]  # type: ignore[attr-defined]
        else:
            ctx.meta["dseal.paths"] = list(rest)
            ctx._protected_args, ctx.args = [], []  # type: ignore[attr-defined]
        return ctx.args


@cli.group("dseal", cls=_Group, invoke_without_command=True,
           help="Seal DICOM files into signed, encrypted envelopes for named peers (--to), or open "
                "envelopes into the archive (--open). FILE arguments, or records/paths on stdin, are the input. "
                "Subcommands: 'keygen NAME' creates this site's keys, 'peers' lists known peers, "
                "'peers add NAME IDENTITY' adds one, 'peers grant NAME share|query|retrieve' grants it access.",
           options_metavar="[OPTIONS] [FILE]...",
           subcommand_metavar="[keygen NAME | peers [add NAME IDENTITY | grant NAME GRANT...]]")
@click.option("--to", "to", multiple=True, metavar="PEER",
              help="Seal for this peer (repeat for several); names from [peers.NAME] in config.toml.")
@click.option("--open", "open_", is_flag=True, help="Open envelopes: verify, decrypt, write into the archive.")
@click.option("--group", "group", type=click.Choice(GROUPS), default=None,
              help="One envelope per study (default), per series, or one for all input [env DTOOLS_SEAL_GROUP].")
@click.option("--passphrase-file", "passphrase_file", metavar="FILE", default=None,
              help="Shared-secret mode: derive the key from the passphrase in FILE (weaker; see dseal(1)).")
@click.option("--resend", is_flag=True,
              help="Seal every input again, even instances already sealed for these peers and unchanged.")
@click.option("--settle", metavar="AGE", default="10s", show_default=True,
              help="With records streaming in on stdin (dserve | dseal --to): seal what has come once no more "
                   "has come for AGE.")
@cli.null_option
def dseal(app, to, open_, group, passphrase_file, resend, settle, null):
    ctx = click.get_current_context()
    if ctx.invoked_subcommand is not None:
        return None
    paths = ctx.meta.get("dseal.paths", [])
    if open_ and to:
        raise UsageError("--open and --to do not go together; seal with --to, open with --open")
    if not open_ and not to:
        raise UsageError("say what to do: --to PEER to seal, --open to open envelopes, or a subcommand (keygen, peers)")
    passphrase = read_passphrase(passphrase_file) if passphrase_file else None
    if passphrase is not None and len(passphrase) < 16 and not open_:
        app.err(f"warning: the passphrase has only {len(passphrase)} bytes; a captured envelope lets anyone "
                "try to guess it offline, so use a long random one (and keys where you can)")
    if paths:
        inputs = ({"path": p} for p in paths)
    else:
        inputs = app.read_records(null=null)
    if resend and open_:
        raise UsageError("--resend applies to sealing (--to), not to --open")
    if open_:
        code = _open(app, inputs, passphrase)
    else:
        from ..mail.common import parse_age

        settle_s = parse_age(settle, "--settle")
        batches = [inputs] if paths or not _streaming_stdin() else _batches(app, null, settle_s)
        code = _seal(app, batches, to, group, passphrase, resend)
    return code if code is not None else (1 if app.failures else 0)


def _streaming_stdin() -> bool:
    import stat

    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (AttributeError, OSError, ValueError):
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _batches(app, null, settle):
    """What a streaming producer sends, in batches that end when it pauses (see --settle)."""
    from .. import records

    return records.read_batches(sys.stdin.buffer, null=null, settle=settle,
                                on_error=lambda line, why: app.fail(f"line {line!r}", why))


def _seal(app, batches, to, group, passphrase, resend):
    import logging

    from ..exchange.ledger import Ledger, ledger_path
    from ..seal.memory import SealMemory

    if not app.verbose:  # pydicom's log lines may quote element values (patient data)
        logging.getLogger("pydicom").setLevel(logging.ERROR)
    config = app.config
    how = config.get("seal.group", "study", flag=group)
    if how not in GROUPS:
        raise ConfigError(f"seal.group = {how!r} is not one of {', '.join(GROUPS)}; fix DTOOLS_SEAL_GROUP or [seal] group")
    names = list(dict.fromkeys(to))
    for n in names:
        keys.check_name(n, "peer name")
    identity = None
    recipients: dict[str, keys.PeerKey] = {}
    if passphrase is None:
        identity = keys.load_identity(config)
        peers = keys.load_peers(config)
        for n in names:
            if n in peers:
                recipients[n] = peers[n]
            elif n == identity.name:
                recipients[n] = identity.public()
            elif n in config.section("peers"):
                raise ConfigError(
                    f"peer {n!r} has no identity; add it with 'dseal peers add {n} \"<line printed by 'dseal keygen' "
                    f"there>\"', or seal with --passphrase-file"
                )
            else:
                raise ConfigError(
                    f"unknown peer {n!r}: there is no [peers.{n}] in {config.path}; add it with "
                    f"'dseal peers add {n} \"<line printed by 'dseal keygen' there>\"' (see 'dseal peers')"
                )
        sender = identity.name
    else:
        try:
            sender = keys.load_identity(config).name
        except ConfigError:
            sender = config.site_name
        if not sender:
            raise ConfigError("this site has no name; set [site] name in config.toml or run 'dseal keygen NAME'")
        keys.check_name(sender, "site name")
    outbox = config.dir("outbox")
    ledger = Ledger(ledger_path(config.home))
    memory = SealMemory(ledger, names, resend=resend)
    sealed = 0
    try:
        for inputs in batches:
            sealed += _seal_batch(app, inputs, how, memory, ledger, outbox, identity, recipients, sender,
                                  passphrase)
    finally:
        ledger.close()
    summary = f"sealed {sealed} envelope(s) for {', '.join(names)}"
    if memory.skipped:
        summary += f"; {memory.skipped} instance(s) already sealed for them and unchanged (--resend sends them again)"
    if app.failures:
        summary += f"; {app.failures} input(s) failed"
    app.info(summary)
    return None


def _seal_batch(app, inputs, how, memory, ledger, outbox, identity, recipients, sender, passphrase) -> int:
    from ..seal.memory import SealLock, recover_sealed

    sealed = 0
    groups = collect(inputs, how, app.fail, app.log.info, warn=app.err, skip=memory.already_sealed)
    if not groups:
        return 0
    # Read the input first, then hold the seal lock only while sealing: an overlapping run
    # waits here, then finds what this one sealed in the ledger and skips it.
    with SealLock(outbox):
        if recover_sealed(ledger):
            app.log.info("put in place envelopes sealed by a run that was killed before it finished")
        if clean_stale_envelopes(outbox):
            app.log.info("removed temporaries left in %s by a killed run", outbox)
        work = [(peers, g) for group_ in groups if group_.entries for peers, g in memory.split(group_)]
        total = sum(g.bytes for _, g in work)
        with app.progress("sealing", total=total, unit="bytes") as advance:
            for peers, g in work:
                try:
                    record = seal_group(g, outbox, identity=identity, recipients=[recipients[p] for p in peers]
                                        if passphrase is None else [], sender=sender, recipient_names=peers,
                                        passphrase=passphrase, advance=advance, ledger=ledger)
                except InputError as exc:
                    app.fail(f"envelope for {len(g.entries)} file(s)", f"{exc}; nothing was written for them")
                    continue
                except OSError as exc:  # the outbox: disk full, permissions
                    raise TempFailure(f"{outbox}: cannot write envelope ({exc.strerror or exc}); "
                                      "free space or fix permissions, then run again") from None
                app.emit(record)
                sealed += 1
                app.log.info("sealed %s: %d file(s), %d bytes", record["envelope_id"], record["instances"],
                             record["bytes"])
    return sealed


def _open(app, inputs, passphrase):
    config = app.config
    try:
        identity = keys.load_identity(config)
    except ConfigError as exc:
        if passphrase is None:
            raise ConfigError(f"{exc}, or give --passphrase-file to open passphrase envelopes") from None
        identity = None
    peers = keys.load_peers(config)
    opener = Opener(config, identity, peers, passphrase, log=app.log.info)
    counts = {"opened": 0, "replays": 0, "skipped": 0}
    try:
        # One envelope at a time, as records arrive, so that 'dmail-recv --idle | dseal --open'
        # opens each envelope as soon as it is fetched.
        with app.progress("opening", total=None, unit="bytes") as advance:
            for record in inputs:
                if record.get("kind") not in (None, "envelope"):
                    counts["skipped"] += 1  # receipts and messages from dmail-recv pass by
                    continue
                p = record.get("path")
                if not isinstance(p, str) or not p:
                    app.fail("record", "has no path to an envelope")
                    continue
                _open_one(app, opener, Path(p).expanduser().absolute(), advance, counts)
    finally:
        opener.close()
    summary = f"opened {counts['opened']} envelope(s)"
    if counts["skipped"]:
        summary += f", skipped {counts['skipped']} record(s) that are not envelopes"
    if counts["replays"]:
        summary += f", {counts['replays']} already opened before"
    if app.failures:
        summary += f"; {app.failures} failed"
    app.info(summary)
    return None


def _open_one(app, opener: Opener, path: Path, advance, counts: dict) -> None:
    config = app.config
    try:
        result = opener.open(path, advance, record=True)
    except InputError as exc:
        where = _quarantine(opener, path, str(exc))
        app.fail(path, f"{exc}; nothing was written" + (f"; set aside in {where}" if where else ""))
        return
    except OSError as exc:  # spool or archive: disk full, permissions
        raise TempFailure(f"{path}: cannot write into {config.home} ({exc.strerror or exc}); "
                          "the envelope is not marked opened; free space or fix permissions, then run again") from None
    if result.replay is not None:
        counts["replays"] += 1
        app.info(f"{path}: envelope {result.envelope_id} was already opened ({result.replay.opened_at}); "
                 "nothing new written")
        return
    for sop, why in result.refused:
        app.fail(f"envelope {result.envelope_id} from {result.peer}", f"instance {sop} {why}")
    for sop, aside in result.replaced:
        app.err(f"envelope {result.envelope_id} from {result.peer}: instance {sop} replaces the version "
                f"{result.peer} sent before; the old one is kept at {aside}")
    for p, why in result.failed:
        app.fail(p, why)
    for rec in result.records:
        app.emit(rec)
    if result.catalog is not None:
        _report_catalog(app, result)
    counts["opened"] += 1
    app.log.info("opened %s from %s: %d file(s)", result.envelope_id, result.peer, len(result.records))


def _report_catalog(app, result) -> None:
    c = result.catalog
    if c.stale:
        app.log.info("envelope %s: a catalog of %s older than the copy kept here; nothing changed",
                     result.envelope_id, result.peer)
        return
    app.log.info("catalog of %s updated: %d row(s) added or changed, %d removed, %d older ones ignored",
                 result.peer, c.rows, c.removed, c.ignored)


def _quarantine(opener: Opener, path: Path, reason: str) -> str | None:
    """Set aside an envelope from the inbox that cannot be opened, so later runs stop offering it."""
    from ..dicom.archive import fsync_dir

    envelope_id = path.name[: -len(".dtenv")] if path.name.endswith(".dtenv") else None
    row = opener.ledger.received(envelope_id) if envelope_id else None
    if row is None or Path(row["path"]) != path or not path.exists():
        return None
    qdir = opener.config.dir("inbox") / "quarantine"
    qdir.mkdir(mode=0o700, exist_ok=True)
    target = qdir / path.name
    os.replace(path, target)
    fsync_dir(qdir)
    opener.ledger.quarantine_received(envelope_id, str(target), reason)
    return str(qdir)


from .dseal_admin import register  # noqa: E402  (the subcommands attach to the group above)

register(dseal)

main = cli.entry(dseal)

if __name__ == "__main__":
    cli.run(dseal)
