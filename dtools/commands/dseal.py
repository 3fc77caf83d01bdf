"""dseal: seal DICOM studies into signed, encrypted envelopes for named peers, and open them.

    dsearch --level instance ... | dseal --to site-b        # envelope records out
    dmail-recv | dseal --open | dindex                      # instance records out
    dseal keygen NAME / dseal peers
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .. import cli
from ..errors import ConfigError, InputError, TempFailure, UsageError
from ..seal import keys
from ..seal.opening import Opener
from ..seal.sealing import GROUPS, clean_stale_envelopes, collect, read_passphrase, seal_group, stat_size


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
                "Subcommands: 'keygen NAME' creates this site's keys, 'peers' lists known peers.",
           options_metavar="[OPTIONS] [FILE]...", subcommand_metavar="[keygen NAME | peers]")
@click.option("--to", "to", multiple=True, metavar="PEER",
              help="Seal for this peer (repeat for several); names from [peers.NAME] in config.toml.")
@click.option("--open", "open_", is_flag=True, help="Open envelopes: verify, decrypt, write into the archive.")
@click.option("--group", "group", type=click.Choice(GROUPS), default=None,
              help="One envelope per study (default), per series, or one for all input [env DTOOLS_SEAL_GROUP].")
@click.option("--passphrase-file", "passphrase_file", metavar="FILE", default=None,
              help="Shared-secret mode: derive the key from the passphrase in FILE (weaker; see dseal(1)).")
@cli.null_option
def dseal(app, to, open_, group, passphrase_file, null):
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
    code = _open(app, inputs, passphrase) if open_ else _seal(app, inputs, to, group, passphrase)
    return code if code is not None else (1 if app.failures else 0)


def _seal(app, inputs, to, group, passphrase):
    import logging

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
    recipients: list[keys.PeerKey] = []
    if passphrase is None:
        identity = keys.load_identity(config)
        peers = keys.load_peers(config)
        for n in names:
            if n in peers:
                recipients.append(peers[n])
            elif n == identity.name:
                recipients.append(identity.public())
            elif n in config.section("peers"):
                raise ConfigError(
                    f"peer {n!r} has no identity; add identity = \"<line printed by 'dseal keygen' there>\" "
                    f"to [peers.{n}] in {config.path}, or seal with --passphrase-file"
                )
            else:
                raise ConfigError(
                    f"unknown peer {n!r}; add [peers.{n}] identity = \"<line printed by 'dseal keygen' there>\" "
                    f"to {config.path} (see 'dseal peers')"
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
    if clean_stale_envelopes(outbox):
        app.log.info("removed temporaries left in %s by a killed run", outbox)
    groups = collect(inputs, how, app.fail, app.log.info)
    total = sum(g.bytes for g in groups)
    sealed = 0
    with app.progress("sealing", total=total, unit="bytes") as advance:
        for g in groups:
            if not g.entries:
                continue
            try:
                record = seal_group(g, outbox, identity=identity, recipients=recipients, sender=sender,
                                    recipient_names=names, passphrase=passphrase, advance=advance)
            except InputError as exc:
                app.fail(f"envelope for {len(g.entries)} file(s)", f"{exc}; nothing was written for them")
                continue
            except OSError as exc:  # the outbox: disk full, permissions
                raise TempFailure(f"{outbox}: cannot write envelope ({exc.strerror or exc}); "
                                  "free space or fix permissions, then run again") from None
            app.emit(record)
            sealed += 1
            app.log.info("sealed %s: %d file(s), %d bytes", record["envelope_id"], record["instances"], record["bytes"])
    app.info(f"sealed {sealed} envelope(s) for {', '.join(names)}" + (f"; {app.failures} input(s) failed" if app.failures else ""))
    return None


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
    items = []
    skipped = 0
    for record in inputs:
        if record.get("kind") not in (None, "envelope"):
            skipped += 1  # receipts and messages from dmail-recv pass by
            continue
        p = record.get("path")
        if not isinstance(p, str) or not p:
            app.fail("record", "has no path to an envelope")
            continue
        items.append(Path(p).expanduser().absolute())
    opened = replays = 0
    with app.progress("opening", total=sum(stat_size(p) for p in items), unit="bytes") as advance:
        for path in items:
            try:
                result = opener.open(path, advance)
            except InputError as exc:
                app.fail(path, f"{exc}; nothing was written")
                continue
            except OSError as exc:  # spool or archive: disk full, permissions
                raise TempFailure(f"{path}: cannot write into {config.home} ({exc.strerror or exc}); "
                                  "the envelope is not marked opened; free space or fix permissions, then run again") from None
            if result.replay is not None:
                replays += 1
                app.info(f"{path}: envelope {result.envelope_id} was already opened ({result.replay.opened_at}); "
                         "nothing new written")
                continue
            for rec in result.records:
                app.emit(rec)
            opener.remember(result.envelope_id, result.peer, result.sha256, len(result.records))
            opened += 1
            app.log.info("opened %s from %s: %d file(s)", result.envelope_id, result.peer, len(result.records))
    summary = f"opened {opened} envelope(s)"
    if skipped:
        summary += f", skipped {skipped} record(s) that are not envelopes"
    if replays:
        summary += f", {replays} already opened before"
    if app.failures:
        summary += f"; {app.failures} failed"
    app.info(summary)
    return None


@dseal.command("keygen", context_settings=cli.CONTEXT_SETTINGS)
@click.argument("name")
@click.option("--force", is_flag=True, help="Replace an existing identity (peers must then update theirs).")
def keygen(name, force):
    """Create this site's identity (X25519 + Ed25519) in HOME/keys and print its public line."""
    app = click.get_current_context().obj
    ident = keys.generate_identity(app.config, name, force=force)
    line = keys.format_public_identity(ident.public())
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    app.info(f"identity {name} written to {app.config.home / 'keys'}; fingerprint {ident.public().fingerprint}")
    app.info(f"peers add it to their config.toml as: [peers.{name}] identity = \"{line}\"")


@dseal.command("peers", context_settings=cli.CONTEXT_SETTINGS)
def peers_cmd():
    """List this site and the known peers with their fingerprints."""
    app = click.get_current_context().obj
    rows = []
    try:
        ident = keys.load_identity(app.config)
        rows.append((ident.name, ident.public().fingerprint, "this site"))
    except ConfigError:
        app.info("this site has no identity yet; run 'dseal keygen NAME'")
    for name, peer in sorted(keys.load_peers(app.config).items()):
        rows.append((name, peer.fingerprint, "peer"))
    width = max((len(r[0]) for r in rows), default=0)
    for name, fp, what in rows:
        sys.stdout.write(f"{name:<{width}}  {fp}  {what}\n")
    sys.stdout.flush()
    if len(rows) <= 1:
        app.info(f"no peers configured; add [peers.NAME] identity = \"...\" to {app.config.path}")


main = cli.entry(dseal)

if __name__ == "__main__":
    cli.run(dseal)
