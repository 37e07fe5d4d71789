"""The `telehealth` command: serve, token, check-config."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path

from aiohttp import web

from config.settings import ConfigError, Settings, load_settings
from relay.errors import HookMissing
from signaling.errors import DirectoryError

logger = logging.getLogger("telehealth")

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
    token.add_argument("--ttl", type=int, default=None, help="lifetime in seconds")
    commands.add_parser("check-config", help="validate the configuration and directory")
    node = commands.add_parser("relay", help="run a standalone relay node that dials out to "
                                             "signaling")
    node.add_argument("--signaling", required=True, help="signaling base URL")
    node.add_argument("--node-token", required=True,
                      help="node token from `telehealth node-token`")
    node.add_argument("--region", default="", help="province code this relay serves")
    node_token = commands.add_parser("node-token",
                                     help="issue the token a standalone relay node presents")
    node_token.add_argument("relay_id", help="the node's id, e.g. bv-bachmai-relay-1")
    node_token.add_argument("--ttl-days", type=int, default=365)
    return parser


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
            from relay.node import serve_node

            return asyncio.run(serve_node(settings, signaling_url=args.signaling,
                                          node_token=args.node_token, region=args.region))
        if args.command == "node-token":
            _, authority = _authority(settings)
            print(authority.issue_node(args.relay_id, ttl_s=args.ttl_days * 86400))
            return 0
        return _check(settings)
    except (ConfigError, DirectoryError, HookMissing) as exc:
        print(f"telehealth: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def _authority(settings: Settings):  # type: ignore[no-untyped-def]
    from signaling.app import directory_path
    from signaling.directory import Directory
    from signaling.tokens import TokenAuthority, load_or_create_secret

    directory = Directory.load(directory_path(settings))
    secret = load_or_create_secret(settings.security.token_secret, settings.storage.data_dir)
    return directory, TokenAuthority(secret, directory, settings.security.token_ttl_s)


def _token(settings: Settings, clinician_id: str, ttl: int | None) -> int:
    directory, authority = _authority(settings)
    if directory.clinician(clinician_id) is None:
        known = ", ".join(sorted(directory.clinicians))
        print(f"telehealth: no clinician {clinician_id!r}; known: {known}", file=sys.stderr)
        return EXIT_CONFIG
    token = authority.issue(clinician_id, ttl_s=ttl)
    print(token)
    print(f"{settings.public_base_url()}/#token={token}", file=sys.stderr)
    return 0


def _check(settings: Settings) -> int:
    directory, _ = _authority(settings)
    print(f"configuration OK: {len(directory.sites)} sites, {len(directory.clinicians)} "
          f"clinicians, data in {settings.storage.data_dir}")
    return 0


async def _serve(settings: Settings) -> int:
    from signaling.app import SERVICES, create_app

    gc.set_threshold(*settings.server.gc_thresholds)
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    # Everything loaded so far lives as long as the process: keep it out of every collection.
    gc.collect()
    gc.freeze()
    site = web.TCPSite(runner, settings.server.host, settings.server.port)
    await site.start()
    port = int(runner.addresses[0][1])
    if settings.server.port == 0:
        settings.server.port = port
    base = settings.public_base_url()
    services = app[SERVICES]
    print(f"Telehealth Bridge listening on {base}", flush=True)
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
    await stop.wait()
    logger.info("shutting down")
    await runner.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
