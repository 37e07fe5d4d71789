"""The `telehealth` command: serve, token, check-config, relay, node-token, archive,
account, directory."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import getpass
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from config.settings import ConfigError, Settings, load_settings
from relay.api import NODE_TOKEN_ENV
from relay.errors import RelayCannotStart
from signaling.directory import Directory
from signaling.errors import DirectoryError
from signaling.tokens import TokenAuthority

logger = logging.getLogger("telehealth")

EXIT_PROBLEMS = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="telehealth", description="Telehealth Bridge")
    parser.add_argument("--config", type=Path, default=None,
                        help="TOML config file (default: $TELEHEALTH_CONFIG, else built-in "
                             "embedded defaults)")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run signaling with the embedded relay")
    serve.add_argument("--host", default=None, help="override server.host")
    serve.add_argument("--port", type=int, default=None, help="override server.port")
    token = commands.add_parser("token", help="issue an access token for a clinician")
    token.add_argument("clinician", help="clinician id from the directory")
    token.add_argument("--ttl", type=_positive_seconds, default=None,
                       help="lifetime in seconds, > 0 (default: security.token_ttl_s)")
    commands.add_parser("check-config", help="validate the configuration and directory")
    node = commands.add_parser("relay", help="run a standalone relay node that dials out to "
                                             "signaling")
    node.add_argument("--signaling", required=True, help="signaling base URL")
    node.add_argument("--node-token", default=None,
                      help="node token from `telehealth node-token` (default: the "
                           f"{NODE_TOKEN_ENV} environment variable, which keeps it out of "
                           "the machine's process list)")
    node.add_argument("--region", default="", help="province code this relay serves")
    node.add_argument("--workers", type=int, default=None,
                      help="relay processes on this machine, each registered as "
                           "<relay id>.w<k> and given its share of the UDP ports; 0: one per "
                           "core (default: relay.workers)")
    # Set by the supervisor of relay/workers.py on the processes it starts.
    node.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    node_token = commands.add_parser("node-token",
                                     help="issue the token a standalone relay node presents")
    node_token.add_argument("relay_id", help="the node's id, e.g. bv-bachmai-relay-1")
    node_token.add_argument("--ttl-days", type=int, default=365)
    archive = commands.add_parser("archive", help="verify, prune or export the recordings archive")
    archive_commands = archive.add_subparsers(dest="archive_command", required=True)
    archive_commands.add_parser("verify", help="re-hash every recorded file against its manifest "
                                               "and check the audit log's chain")
    prune = archive_commands.add_parser("prune", help="remove consultations older than "
                                                      "recording.retention_years")
    prune.add_argument("--dry-run", action="store_true", help="list what would go, remove nothing")
    export = archive_commands.add_parser("export", help="one WebM of a consultation: participants "
                                                        "side by side, audio mixed")
    export.add_argument("consultation_id")
    export.add_argument("--out", type=Path, default=None,
                        help="output file (default: ./<consultation id>.webm)")
    account = commands.add_parser("account", help="clinicians' accounts (passwords)")
    account_commands = account.add_subparsers(dest="account_command", required=True)
    activation = account_commands.add_parser(
        "activation", help="print a one-time link and code to set (or reset) a password")
    activation.add_argument("clinician", help="clinician id from the directory")
    directory = commands.add_parser("directory", help="import or export the directory (regions, "
                                                      "sites, clinicians) in the store")
    directory_commands = directory.add_subparsers(dest="directory_command", required=True)
    imports = directory_commands.add_parser(
        "import", help="add or replace regions, sites and clinicians from a CSV (kind,id,name,"
                       "site,tier,region,roles,specialties,active) or TOML directory file; all "
                       "or nothing")
    imports.add_argument("file", type=Path)
    imports.add_argument("--dry-run", action="store_true",
                         help="check every row and report, change nothing")
    imports.add_argument("--server", default=None,
                         help="a running server's base URL: import through its admin API")
    imports.add_argument("--token", default=None, help="an admin's access token (--server)")
    exports = directory_commands.add_parser("export", help="the whole directory as CSV")
    exports.add_argument("--out", type=Path, default=None, help="file (default: stdout)")
    return parser


def _positive_seconds(text: str) -> int:
    """An argparse type: a whole number of seconds above 0 (a token issued with 0 or less
    would be expired when printed)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {value}")
    return value


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, dict[str, object]] = {}
    if getattr(args, "host", None) is not None:
        overrides.setdefault("server", {})["host"] = args.host
    if getattr(args, "port", None) is not None:
        overrides.setdefault("server", {})["port"] = args.port
    return load_settings(args.config, overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
        logging.basicConfig(
            level=settings.logging.level,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        if args.command == "serve":
            return asyncio.run(_serve(settings))
        if args.command == "token":
            return _token(settings, args.clinician, args.ttl)
        if args.command == "relay":
            return _relay(settings, args)
        if args.command == "node-token":
            _, authority = _authority(settings)
            print(authority.issue_node(args.relay_id, ttl_s=args.ttl_days * 86400))
            return 0
        if args.command == "archive":
            return _archive(settings, args)
        if args.command == "account":
            return asyncio.run(_account_activation(settings, args.clinician))
        if args.command == "directory":
            return _directory(settings, args)
        return _check(settings)
    except (ConfigError, DirectoryError, RelayCannotStart) as exc:
        print(f"telehealth: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _relay(settings: Settings, args: argparse.Namespace) -> int:
    """One node, or with more than one worker the supervisor of relay/workers.py."""
    from relay.node import serve_node
    from relay.workers import supervise, worker_command, worker_count, worker_settings

    node_token = args.node_token or os.environ.get(NODE_TOKEN_ENV, "")
    if not node_token:
        print(f"telehealth relay: a node token is needed: --node-token, or {NODE_TOKEN_ENV} "
              "in the environment (`telehealth node-token <relay-id>` issues one)",
              file=sys.stderr)
        return 2
    workers = worker_count(settings.relay.workers if args.workers is None else args.workers)
    if args.worker is not None:
        return asyncio.run(serve_node(worker_settings(settings, args.worker, workers),
                                      signaling_url=args.signaling,
                                      node_token=node_token, region=args.region,
                                      worker=args.worker))
    if workers == 1:
        return asyncio.run(serve_node(settings, signaling_url=args.signaling,
                                      node_token=node_token, region=args.region))
    for k in range(workers):
        worker_settings(settings, k, workers)  # a port range too small stops us here
    import jwt

    try:  # the token names the machine; signaling verifies it, here it names the logs
        machine = str(jwt.decode(node_token, options={"verify_signature": False})
                      .get("sub") or settings.relay.id)
    except jwt.InvalidTokenError:
        machine = settings.relay.id  # the workers are refused, and say why
    # The workers get the token in their environment, never on their command lines.
    argv = [*(["--config", str(args.config)] if args.config is not None else []), "relay",
            "--signaling", args.signaling, "--region", args.region, "--workers", str(workers)]
    return asyncio.run(supervise(machine, workers, lambda k: worker_command(argv, k),
                                 signaling_url=args.signaling,
                                 drain_s=settings.relay.drain_s,
                                 env={**os.environ, NODE_TOKEN_ENV: node_token}))


def _authority(settings: Settings) -> tuple[Directory, TokenAuthority]:
    # The start-up module loads aiortc and PyAV: only `serve` needs them at once.
    from telehealth.startup import token_authority

    return token_authority(settings)


def _token(settings: Settings, clinician_id: str, ttl: int | None) -> int:
    directory, authority = _authority(settings)
    if directory.clinician(clinician_id) is None:
        known = ", ".join(sorted(directory.clinicians))
        print(f"telehealth: no clinician {clinician_id!r}; known: {known}", file=sys.stderr)
        return EXIT_CONFIG
    from telehealth.tls import CertificateInfo, doctor_url

    token = authority.issue(clinician_id, ttl_s=ttl)
    print(token)
    certificate = None
    if settings.tls.cert_file is not None:
        with contextlib.suppress(OSError, ValueError):
            certificate = CertificateInfo.read(settings.tls.cert_file)
    base = doctor_url(settings, settings.server.port, certificate)
    print(f"{base}/#token={token}", file=sys.stderr)
    return 0


async def _account_activation(settings: Settings, clinician_id: str) -> int:
    """A one-time activation (or reset) code for ``clinician_id``, written to the accounts
    the server reads (its accounts.sqlite3, or PostgreSQL with ``storage.backend =
    "postgresql"``; a new code replaces the previous one), and its link."""
    from recorder.audit import AUDIT_LOG, AuditLog
    from signaling.account_backends import accounts_for
    from signaling.auth_api import ACTIVATE_FRAGMENT
    from telehealth.tls import CertificateInfo, doctor_url

    directory, authority = _authority(settings)
    if directory.clinician(clinician_id) is None:
        print(f"telehealth: no clinician {clinician_id!r} in the directory", file=sys.stderr)
        return EXIT_CONFIG
    accounts = accounts_for(settings, directory=directory, tokens=authority,
                            audit=AuditLog(settings.archive_dir() / AUDIT_LOG))
    await accounts.open()
    try:
        issued = await accounts.issue_activation(clinician_id, actor=f"cli:{_user()}",
                                                 address=None)
    finally:
        await accounts.close()
    certificate = None
    if settings.tls.cert_file is not None:
        with contextlib.suppress(OSError, ValueError):
            certificate = CertificateInfo.read(settings.tls.cert_file)
    base = doctor_url(settings, settings.server.port, certificate)
    hours = settings.accounts.activation_ttl_s / 3600
    print(f"One-time link for {clinician_id} (valid {hours:g} h; a new one replaces it):")
    print(f"  {base}/{ACTIVATE_FRAGMENT}{issued.code}")
    print(f"code: {issued.code}")
    return 0


def _check(settings: Settings) -> int:
    if settings.directory.file is not None:
        Directory.load(settings.directory.file)  # only an import source now, still checked
    directory, _ = _authority(settings)
    print(f"configuration OK: {len(directory.sites)} sites, {len(directory.clinicians)} "
          f"clinicians, data in {settings.storage.data_dir}")
    return 0


def _archive(settings: Settings, args: argparse.Namespace) -> int:
    from recorder.archive import ArchiveError, prune, verify_archive
    from recorder.audit import AUDIT_LOG, AuditLog

    archive = settings.archive_dir()
    audit = AuditLog(archive / AUDIT_LOG)
    if args.archive_command == "verify":
        report = verify_archive(archive)
        for problem in report.problems:
            print(problem)
        summary = (f"{report.consultations} consultations, {report.files_checked} files "
                   f"({report.bytes_checked / 1e6:.1f} MB) re-hashed, {report.gaps} recording "
                   f"gaps (relay moves, restarts), {report.audit_entries} audit entries in "
                   f"{archive}")
        if report.ok:
            print(f"archive OK: {summary}")
            return 0
        print(f"{len(report.problems)} problems: {summary}", file=sys.stderr)
        return EXIT_PROBLEMS
    if args.archive_command == "prune":
        years = settings.recording.retention_years
        pruned = prune(archive, now=time.time(), retention_years=years, audit=audit,
                       dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        for cid in pruned:
            print(f"{verb} {cid}")
        print(f"{verb} {len(pruned)} consultations older than {years:g} years from {archive}",
              file=sys.stderr)
        return 0
    from recorder.export import export

    cid = args.consultation_id
    out = args.out if args.out is not None else Path(f"{cid}.webm")
    bar = _ProgressBar()
    try:
        path = export(archive, cid, out, progress=bar)
    except (ArchiveError, OSError) as exc:
        bar.close()
        print(f"telehealth: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    bar.close()
    audit.append("cli", "archive.export", cid, {"out": path.name, "user": _user()})
    print(path)
    return 0


def _directory(settings: Settings, args: argparse.Namespace) -> int:
    """On the records of ``storage.backend`` (a running server does not see the change:
    ``--server`` imports through its ``POST /api/directory/import`` instead)."""
    from recorder.audit import AUDIT_LOG, AuditLog
    from signaling.directory_admin import cli_export, cli_import, cli_import_remote
    from signaling.records import record_store
    from telehealth.startup import load_directory

    if args.directory_command == "import" and args.server is not None:
        return cli_import_remote(args.server, args.token or "", args.file,
                                 dry_run=args.dry_run)
    directory = load_directory(settings)
    if args.directory_command == "export":
        return cli_export(directory, args.out)
    return cli_import(directory, record_store(settings.storage),
                      AuditLog(settings.archive_dir() / AUDIT_LOG), args.file,
                      dry_run=args.dry_run, actor=f"cli:{_user()}")


class _ProgressBar:
    """``\\r[#####.....] 42%`` on stderr, redrawn when the percentage changes."""

    def __init__(self, width: int = 30) -> None:
        self.width = width
        self.percent = -1

    def __call__(self, fraction: float) -> None:
        percent = int(fraction * 100)
        if percent == self.percent:
            return
        self.percent = percent
        filled = round(fraction * self.width)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {percent:3d}%")
        sys.stderr.flush()

    def close(self) -> None:
        if self.percent >= 0:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


async def _serve(settings: Settings) -> int:
    from signaling.http_api import runner_options
    from telehealth.startup import SERVICES, create_app, http_shutdown_timeout
    from telehealth.tls import doctor_url, listen

    gc.set_threshold(*settings.server.gc_thresholds)
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=http_shutdown_timeout(settings),
                           **runner_options(settings.server, app[SERVICES].metrics))
    await runner.setup()
    # Everything loaded so far lives as long as the process: keep it out of every collection.
    gc.collect()
    gc.freeze()
    try:
        listening = await listen(runner, settings)
    except ConfigError:
        await runner.cleanup()
        raise
    if settings.server.port == 0:
        settings.server.port = listening.port
    certificate = listening.certificate
    base = doctor_url(settings, listening.port, certificate.info if certificate else None)
    services = app[SERVICES]
    print(f"Telehealth Bridge listening on {base}", flush=True)
    if listening.redirect_port is not None:
        print(f"  http on port {listening.redirect_port} redirects to https", flush=True)
    if settings.directory.file is None:
        print("Demo directory in use. Sign-in links (valid "
              f"{settings.security.token_ttl_s // 3600} h):", flush=True)
        for clinician in services.directory.clinicians.values():
            site_ = services.directory.sites[clinician.site_id]
            token = services.tokens.issue(clinician.id)
            roles = ", ".join(sorted(clinician.roles))
            print(f"  {clinician.name} ({roles}, {site_.name}):\n    {base}/#token={token}",
                  flush=True)
    print(f"READY {base}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if certificate is not None:
        # certbot's deploy hook or the hospital's renewal script: `kill -HUP <pid>`.
        loop.add_signal_handler(signal.SIGHUP, certificate.reload)
    await stop.wait()
    if certificate is not None:
        loop.remove_signal_handler(signal.SIGHUP)
    await listening.close_redirect()
    return await _stop(runner, settings.server.drain_s)


EXIT_SECOND_SIGNAL = 130
"""A second SIGTERM/SIGINT during a stop: exit at once (what is unfinished is abandoned; a
recording being written is marked interrupted at the next start)."""


async def _stop(runner: web.AppRunner, drain_s: float) -> int:
    """The stop after the first SIGTERM/SIGINT (startup.py, ``Stopping``: stop listening, tell
    and close every session, let requests in flight finish; then ``runner.cleanup()`` closes
    the timers, recorder, records and relay in reverse order), within ``drain_s`` whatever the
    clients do. A second signal exits at once with ``EXIT_SECOND_SIGNAL``."""
    from telehealth.startup import STOPPING

    stopping = runner.app[STOPPING]
    for signum in (signal.SIGINT, signal.SIGTERM):
        # From here on a Python-level handler: it runs even while the event loop is stuck.
        asyncio.get_running_loop().remove_signal_handler(signum)
        signal.signal(signum, _second_signal)
    # Armed until the process exits: it also bounds what asyncio.run and the interpreter do
    # after this returns (cancelling leftover tasks, joining worker threads).
    StopDeadline(drain_s, lambda: stopping.step)
    started = time.monotonic()
    logger.info("stopping: telling clients, finishing recordings; exit within %.1f s "
                "(a second signal exits at once)", drain_s)
    await stopping.begin(runner)
    await runner.cleanup()
    logger.info("stopped in %.1f s", time.monotonic() - started)
    return 0


class StopDeadline:
    """A hard deadline for a stop: after ``seconds``, one log line naming the step under way
    (``step()``) and the process exits with code 0, from a thread so that neither a stuck
    event loop nor a stuck worker thread can hold it."""

    def __init__(self, seconds: float, step: Callable[[], str],
                 exit: Callable[[int], object] = os._exit) -> None:
        self.seconds = seconds
        self._step = step
        self._exit = exit
        self._timer = threading.Timer(seconds, self._abandon)
        self._timer.daemon = True
        self._timer.start()

    def _abandon(self) -> None:
        logger.warning("stop: drain time of %.1f s is over while %s; exiting, the rest "
                       "abandoned", self.seconds, self._step())
        _flush()
        self._exit(0)


def _second_signal(signum: int, _frame: object) -> None:
    logger.warning("stop: second %s; exiting at once (code %d)", signal.Signals(signum).name,
                   EXIT_SECOND_SIGNAL)
    _flush()
    os._exit(EXIT_SECOND_SIGNAL)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


if __name__ == "__main__":
    sys.exit(main())
