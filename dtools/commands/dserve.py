"""dserve: a DICOM node on the site's index and archive (C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET)."""

from __future__ import annotations

import logging
import warnings
import errno
import signal
import sys
import threading

import click

from .. import cli
from ..errors import ConfigError, DtoolsError, UsageError
from ..net.common import DEFAULT_AET, DEFAULT_PORT, check_aet, destinations, parse_port

GRACE = 10.0


@cli.command("dserve", short_help="Serve the archive and index as a DICOM node (Storage, Query/Retrieve).")
@click.option("--aet", metavar="AET", default=None,
              help=f"Our AE title [env DTOOLS_DSERVE_AET; config [dserve] aet; default {DEFAULT_AET}].")
@click.option("--port", metavar="PORT", default=None,
              help=f"TCP port to listen on [config [dserve] port; default {DEFAULT_PORT}].")
@click.option("--bind", "--host", "bind", metavar="ADDR", default=None,
              help="Address to listen on [config [dserve] bind; default 0.0.0.0, all interfaces].")
@click.option("--allow", metavar="AET", multiple=True,
              help="Accept associations only from this calling AE title (repeatable) "
                   "[config [dserve] allow = [...]; default anyone].")
@click.option("--any-called-aet", "any_called_aet", is_flag=True, default=None,
              help="Accept associations whatever AE title they call; by default only those calling --aet "
                   "[config [dserve] accept_any_called_aet = true].")
@click.option("--destination", metavar="AET=HOST:PORT", multiple=True,
              help="A C-MOVE destination (repeatable), added to [dserve.destinations].")
@click.option("--max-associations", type=int, metavar="N", default=None,
              help="Concurrent associations accepted [config [dserve] max_associations; default 10].")
@click.option("--timeout", type=float, metavar="SECONDS", default=None,
              help="Idle and DIMSE timeout per association [config [dserve] timeout; default 60].")
@click.option("--sync", type=click.Choice(["always", "batch"]), default=None,
              help="When received files are fsynced: 'always' before each C-STORE is answered, or 'batch' "
                   "with each index batch, before its records are printed [config [dserve] sync; default always].")
@click.option("--grace", type=float, metavar="SECONDS", default=None,
              help=f"On SIGTERM, how long running associations may finish before they are aborted "
                   f"[config [dserve] grace; default {GRACE:g}].")
@click.option("--relay", "serve_relay", is_flag=True,
              help="Also serve the relay: answer granted peers' queries and retrieve requests, and publish "
                   "this site's catalog to the peers it shares with (IMAP IDLE).")
@click.option("--once", is_flag=True,
              help="With --relay: one pass (answer what waits, publish what changed), then exit; opens no "
                   "DICOM port (for cron).")
@click.option("--insecure-skip-verify", "insecure", is_flag=True,
              help="INSECURE: with --relay, do not verify the relay server's TLS certificate (test servers only).")
def cmd(app: cli.App, aet, port, bind, allow, any_called_aet, destination, max_associations, timeout, sync,
        grace, serve_relay, once, insecure):
    """Listen for DICOM associations and serve this site's archive and index.

    C-STORE writes each instance atomically into HOME/archive/<Study>/<Series>/<SOP>.dcm,
    indexes it and prints its `instance` record on standard output, so
    `dserve | dseal --to site-b | dmail-send` relays what modalities send, live.
    C-FIND answers from the index (Patient Root and Study Root, every level); C-MOVE
    sends to destinations known by AE title; C-GET returns over the same association,
    each instance as stored or converted to a syntax the receiver accepts. Associations
    must call --aet unless --any-called-aet is given, or a peer's AE title
    ([peers.NAME] aet): the bridge answers those from the peer's catalog and fetches
    its studies through the relay.
    """
    if once and not serve_relay:
        raise UsageError("--once applies to --relay: 'dserve --relay --once'")
    if insecure and not serve_relay:
        raise UsageError("--insecure-skip-verify applies to --relay")
    if once:
        return _relay_once(app, insecure)
    from ..net.scp import Server, ServerSettings
    # pydicom warns about every odd value a peer sends; the records and -v logs say what matters
    warnings.filterwarnings("ignore", module="pydicom")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    # ...and with those warnings unseen, checking every value pydicom builds is pure cost: each
    # C-STORE response is a new command Dataset whose elements pydicom would validate (about
    # a tenth of the CPU of a small C-STORE). Only warnings are lost: the default mode warns.
    from pydicom import config as pydicom_config
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

    cfg = app.config
    settings = ServerSettings(
        aet=check_aet(cfg.get("dserve.aet", DEFAULT_AET, flag=aet), "--aet"),
        bind=str(cfg.get("dserve.bind", "0.0.0.0", flag=bind)),
        port=parse_port(cfg.get("dserve.port", DEFAULT_PORT, flag=port), "--port"),
        archive=cfg.dir("archive"),
        index_path=cfg.index_path,
        allow=[check_aet(a, "--allow") for a in (allow or _as_list(cfg.get("dserve.allow", [])))],
        destinations=destinations(cfg, destination),
        max_associations=cfg.get("dserve.max_associations", 10, flag=max_associations, type=int),
        timeout=cfg.get("dserve.timeout", 60.0, flag=timeout, type=float),
        sync=str(cfg.get("dserve.sync", "always", flag=sync)),
        any_called_aet=bool(cfg.get("dserve.accept_any_called_aet", flag=any_called_aet)),
        bridges=bridges(cfg),
        live_peers={n for n in cfg.section("peers") if cfg.get(f"peers.{n}.live")},
        bridge_wait=cfg.get("dserve.bridge_wait", 300.0, type=float),
        config=cfg,
    )
    if settings.aet in settings.bridges:
        raise ConfigError(f"--aet {settings.aet} is [peers.{settings.bridges[settings.aet]}] aet too; dserve and "
                          "each bridged peer need AE titles of their own")
    if settings.sync not in ("always", "batch"):
        raise ConfigError(f"[dserve] sync = {settings.sync!r}: use \"always\" or \"batch\"")
    grace_s = cfg.get("dserve.grace", GRACE, flag=grace, type=float)
    if settings.max_associations < 1:
        raise ConfigError("--max-associations must be at least 1")
    if settings.timeout <= 0 or grace_s < 0:
        raise ConfigError("--timeout must be positive and --grace not negative")
    cfg.ensure_home()

    # The indexer process prints the records on our stdout itself: if dserve is killed, the
    # records of what it stored and the indexer still commits are not lost to the pipe.
    sys.stdout.flush()
    try:
        records_fd: int | None = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (an embedding program's stream)
        records_fd = None
    server = Server(settings, app.emit, records_fd=records_fd)
    try:
        server.start()
    except OSError as exc:
        server.shutdown(0)
        hint = "choose another --port" if exc.errno == errno.EADDRINUSE else "check --bind and --port (ports below 1024 need privileges)"
        raise ConfigError(f"cannot listen on {settings.bind}:{settings.port} ({exc.strerror or exc}); {hint}") from None

    for bridged, peer in settings.bridges.items():
        app.log.info("answering as %s for peer %s (the bridge)%s", bridged, peer,
                     "" if serve_relay else "; without --relay, deferred forwards wait for 'dserve --relay --once'")
    app.info(f"listening on {settings.bind}:{settings.port} as {settings.aet}"
             + (f" and {', '.join(settings.bridges)} (bridged peers)" if settings.bridges else "")
             + (" (and any called AE title)" if settings.any_called_aet else "")
             + (f", allowing {', '.join(settings.allow)}" if settings.allow else ""))
    relay_stop = threading.Event()
    relay_thread = None
    if serve_relay:
        relay_thread = threading.Thread(target=_relay_forever, args=(app, insecure, relay_stop), name="dserve-relay",
                                        daemon=True)
        relay_thread.start()
    # Our own signal handlers: a signal only sets a flag, and the main thread shuts down
    # in order (stop accepting, finish or abort associations, commit the index).
    stop = threading.Event()
    got: list[int] = []

    def on_signal(signum, frame):
        got.append(signum)
        stop.set()
        if len(got) > 1:  # a second signal: stop waiting for associations
            server.force = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(0.5):
            if server.fatal_event.is_set():
                break
    finally:
        app.log.info("shutting down")
        relay_stop.set()
        server.shutdown(grace_s)
        if relay_thread is not None:
            relay_thread.join(10)
        for s, h in old.items():
            signal.signal(s, h)
    app.info(f"stored {server.stored} instance(s), indexed {server.indexer.indexed}")
    if server.fatal:
        if "standard output was closed" in server.fatal:
            app.err(server.fatal)
            return 141
        app.err(server.fatal)
        return 75
    if got and got[0] == signal.SIGINT:
        raise KeyboardInterrupt
    if got:
        raise cli.Terminated()
    return 0


def _relay_service(app: cli.App, insecure: bool):
    from ..remote.service import RelayService

    return RelayService(app.config, insecure=insecure, publish=_publisher(app), fail=app.fail,
                        chores=_forwarder(app))


def _forwarder(app: cli.App):
    """Deferred forwards of the bridge (when some peer has an AE title): on every pass, store
    what has arrived since to its C-MOVE destination."""
    if not bridges(app.config):
        return None
    from ..exchange.forwards import run_forwards

    dests = destinations(app.config)
    aet = check_aet(app.config.get("dserve.aet", DEFAULT_AET), "[dserve] aet")
    timeout = app.config.get("dserve.timeout", 60.0, type=float)
    peer_aets = {peer: bridged for bridged, peer in bridges(app.config).items()}
    return lambda: run_forwards(app.config, dests, aet, timeout, peer_aets)


def bridges(config) -> dict[str, str]:
    """``[peers.NAME] aet`` of every peer that has one: the AE titles dserve answers for them."""
    out: dict[str, str] = {}
    own = str(config.get("dserve.aet", DEFAULT_AET)).strip()
    for name in sorted(config.section("peers")):
        value = config.get(f"peers.{name}.aet")
        if value is None:
            continue
        try:
            aet = check_aet(str(value), f"[peers.{name}] aet")
        except UsageError as exc:
            raise ConfigError(f"{exc}; fix it in {config.path}") from None
        if aet == own:
            raise ConfigError(f"[peers.{name}] aet = {aet!r} is dserve's own AE title ([dserve] aet); give the peer "
                              f"another in {config.path}")
        if aet in out:
            raise ConfigError(f"[peers.{name}] aet = {aet!r} is also [peers.{out[aet]}] aet; each peer needs its "
                              f"own AE title ({config.path})")
        out[aet] = name
    return out


def _publisher(app: cli.App):
    """Publish this site's catalog to the peers granted ``share``; the envelopes go out with
    the service's next deposit."""
    from ..remote.catalog import publish_catalog

    return lambda service: len(publish_catalog(app.config, service.ledger))


def _relay_once(app: cli.App, insecure: bool) -> int | None:
    app.config.ensure_home()
    service = _relay_service(app, insecure)
    try:
        service.run_once()
    finally:
        service.close()
    c = service.counts
    app.info(f"answered {c['answered']} request(s), refused {c['refused']}, published {c['published']} "
             "catalog update(s)" + (f", completed {c['forwarded']} deferred forward(s)" if c["forwarded"] else ""))
    return None


def _relay_forever(app: cli.App, insecure: bool, stop: threading.Event) -> None:
    """The relay side of a running dserve: it never takes the DICOM node down. A relay that
    cannot be reached is tried again every 30 seconds, and says so in the log."""
    publish_every = app.config.get("dserve.publish_interval", 60.0, type=float)
    while not stop.is_set():
        try:
            service = _relay_service(app, insecure)
            try:
                service.run(stop, publish_every=publish_every)
            finally:
                service.close()
        except DtoolsError as exc:
            app.err(f"relay: {exc}; trying again in 30 s")
            stop.wait(30)
        except Exception as exc:  # a bug: keep the DICOM node up, report it
            app.err(f"relay: internal error: {type(exc).__name__}: {exc}; trying again in 30 s")
            stop.wait(30)


def _as_list(value) -> list[str]:
    if isinstance(value, str):
        return [v for v in value.replace(",", " ").split() if v]
    return [str(v) for v in value or []]


main = cli.entry(cmd)

if __name__ == "__main__":
    cli.run(cmd)
