"""dseal's subcommands for the site's keys and its peers: keygen, peers, peers add, peers grant.

Each writes config.toml through configfile (tomlkit), so the rest of the file stays as
the administrator wrote it, and nothing needs editing by hand.
"""

from __future__ import annotations

import sys

import click

from .. import cli, configfile
from ..errors import ConfigError, UsageError
from ..remote.grants import GRANTS
from ..seal import keys


def register(group: click.Group) -> None:
    group.add_command(keygen)
    group.add_command(peers_cmd)


@click.command("keygen", cls=cli.Command, context_settings=cli.CONTEXT_SETTINGS)
@click.argument("name")
@click.option("--force", is_flag=True,
              help="Replace an existing identity, and the [site] name in config.toml (peers must then update theirs).")
@cli.subcommand_options
def keygen(name, force):
    """Create this site's identity (X25519 + Ed25519) in HOME/keys, write [site] name into
    config.toml if it has none, and print the public line."""
    app = click.get_current_context().obj
    config = app.config
    keys.check_name(name)
    configured = config.file_value("site.name")
    if configured not in (None, name) and not force:
        raise ConfigError(f"{config.path} names this site {configured!r}, not {name!r}; run 'dseal keygen {configured}', "
                          f"or --force to rename the site (its peers must then update their config)")
    ident = keys.generate_identity(config, name, force=force)
    line = keys.format_public_identity(ident.public())
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    app.info(f"identity {name} written to {config.home / 'keys'}; fingerprint {ident.public().fingerprint}")
    if configfile.edit(config.path, lambda doc: _set_site_name(doc, name)):
        app.info(f"[site] name = \"{name}\" written to {config.path}")
    app.info(f"at each peer, run: dseal peers add {name} \"{line}\"")


def _set_site_name(doc, name: str) -> bool:
    site = configfile.table(doc, "site")
    if site.get("name") == name:
        return False
    site["name"] = name
    return True


@click.group("peers", cls=cli.Group, context_settings=cli.CONTEXT_SETTINGS, invoke_without_command=True,
             subcommand_metavar="[add NAME IDENTITY | grant NAME GRANT...]")
@cli.subcommand_options
@click.pass_context
def peers_cmd(ctx):
    """List this site and the known peers with their fingerprints and grants; 'add' adds a
    peer, 'grant' grants it share, query or retrieve."""
    if ctx.invoked_subcommand is not None:
        return
    app = ctx.obj
    rows = []
    try:
        ident = keys.load_identity(app.config)
        rows.append((ident.name, ident.public().fingerprint, "this site"))
    except ConfigError:
        app.info("this site has no identity yet; run 'dseal keygen NAME'")
    for name, peer in sorted(keys.load_peers(app.config).items()):
        grants = [g for g in GRANTS if app.config.get(f"peers.{name}.{g}")]
        rows.append((name, peer.fingerprint, f"peer; granted: {', '.join(grants)}" if grants else "peer"))
    width = max((len(r[0]) for r in rows), default=0)
    for name, fp, what in rows:
        sys.stdout.write(f"{name:<{width}}  {fp}  {what}\n")
    sys.stdout.flush()
    if len(rows) <= 1:
        app.info("no peers configured; add one with: dseal peers add NAME \"<line printed by 'dseal keygen' there>\"")


@peers_cmd.command("add", context_settings=cli.CONTEXT_SETTINGS)
@click.argument("name")
@click.argument("identity")
@click.option("--force", is_flag=True, help="Replace the keys of a peer that is known already (it made new keys).")
@click.option("--rename", is_flag=True,
              help="Know the peer as NAME although its identity names it otherwise.")
@cli.subcommand_options
def peers_add(name, identity, force, rename):
    """Add a peer to config.toml: [peers.NAME] identity = IDENTITY, the line that
    'dseal keygen' printed at that site. The rest of the file is kept as it is."""
    app = click.get_current_context().obj
    config = app.config
    keys.check_name(name, "peer name")
    key = keys.parse_public_identity(identity)
    if key.name != name and not rename:
        raise ConfigError(f"the identity names the site {key.name!r}, not {name!r}; relay folders and receipts use "
                          f"the site's own name, so run 'dseal peers add {key.name} ...', or --rename to know it "
                          f"as {name!r} anyway")
    try:
        own = keys.load_identity(config)
    except ConfigError:
        own = None
    if own is not None and own.public().same_keys(key):
        raise ConfigError("that is this site's own identity; add the line printed by 'dseal keygen' at the peer")
    for other, peer in keys.load_peers(config).items():
        if other != name and peer.same_keys(key) and not force:
            raise ConfigError(f"these keys are known already as peer {other!r}; use --force to know them under "
                              f"{name!r} too")
    line = keys.format_public_identity(key)

    def change(doc) -> bool:
        entry = configfile.table(doc, "peers", name)
        old = entry.get("identity")
        if old is not None and str(old).split() == line.split():
            return False
        if old is not None and not force:
            try:
                was = f" (fingerprint {keys.parse_public_identity(str(old)).fingerprint})"
            except ConfigError:
                was = ""
            raise ConfigError(f"peer {name!r} is known already with other keys{was}; if it made new keys, compare "
                              f"the new fingerprint {key.fingerprint} with it and rerun with --force")
        entry["identity"] = line
        return True

    if configfile.edit(config.path, change):
        app.info(f"peer {name} added to {config.path}; fingerprint {key.fingerprint}: compare it with "
                 f"what 'dseal peers' shows at {key.name}")
    else:
        app.info(f"peer {name} is known already with these keys; nothing changed")


@peers_cmd.command("grant", context_settings=cli.CONTEXT_SETTINGS)
@click.argument("name")
@click.argument("grants", nargs=-1, required=True, metavar="share|query|retrieve...")
@click.option("--revoke", is_flag=True, help="Take these grants back instead.")
@cli.subcommand_options
def peers_grant(name, grants, revoke):
    """Grant peer NAME (or take back, with --revoke) what it may have of this site's archive:
    share (send it the catalog), query (answer its live queries), retrieve (send it the
    studies it asks for). Writes [peers.NAME] in config.toml."""
    app = click.get_current_context().obj
    config = app.config
    for g in grants:
        if g not in GRANTS:
            raise UsageError(f"unknown grant {g!r}; grants are: {', '.join(GRANTS)}")
    if name not in config.section("peers"):
        raise ConfigError(f"peer {name!r} is not in {config.path}; add it first with 'dseal peers add {name} "
                          f"\"<line printed by 'dseal keygen' there>\"'")

    def change(doc) -> bool:
        entry = configfile.table(doc, "peers", name)
        changed = False
        for g in grants:
            if bool(entry.get(g, False)) != (not revoke):
                entry[g] = not revoke
                changed = True
        return changed

    changed = configfile.edit(config.path, change)
    now = [g for g in GRANTS if ((not revoke) if g in grants else bool(config.get(f"peers.{name}.{g}")))]
    app.info(f"peer {name} may now have: {', '.join(now) or 'nothing'}"
             f"{'' if changed else ' (unchanged)'}; {config.path}")
