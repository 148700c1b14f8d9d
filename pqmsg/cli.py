"""The ``pqmsg`` command: ``serve``, ``migrate`` and ``audit export``.

This is the only place that reads ``os.environ``: settings come from
``PQMSG_*`` variables first, then flags override them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import trio

from pqmsg import __version__
from pqmsg.settings import ENVIRONMENT, Settings, SettingsError

log = logging.getLogger("pqmsg")

EXIT_CONFIG = 2
EXIT_CRASH = 1


def _environment_help() -> str:
    lines = ["environment variables (flags override them):"]
    for name, (_path, _parse, text) in ENVIRONMENT.items():
        lines.append(f"  {name:38} {text}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pqmsg",
        description="pqmsg-server: a post-quantum, end-to-end-encrypted messaging relay.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'pqmsg serve --help' for the server's options and environment variables.",
    )
    parser.add_argument("--version", action="version", version=f"pqmsg-server {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the relay (embedded SQLite by default)",
        description=(
            "Run the relay. With no flags and no environment it serves HTTP/1.1 and cleartext "
            "HTTP/2 (prior knowledge and Upgrade) on 127.0.0.1:8080, with SQLite and the audit "
            "log under ./pqmsg-data, in-process rate limits and nonce cache, and push disabled."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_environment_help(),
    )
    serve.add_argument(
        "--bind", action="append", metavar="HOST:PORT",
        help="address to listen on; repeat for several (default 127.0.0.1:8080)",
    )
    _data_dir_option(serve)
    serve.add_argument("--certfile", type=Path, help="TLS certificate chain (PEM); serves h2 and http/1.1 via ALPN")
    serve.add_argument("--keyfile", type=Path, help="TLS private key (PEM); goes with --certfile")
    serve.add_argument("--workers", type=int, metavar="N", help="worker processes sharing the listening sockets")

    migrate = sub.add_parser("migrate", help="apply pending database migrations and exit")
    _data_dir_option(migrate)

    audit = sub.add_parser("audit", help="audit log tools")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    export = audit_sub.add_parser(
        "export", help="copy closed audit segments to another directory (off-host export)"
    )
    _data_dir_option(export)
    export.add_argument("--since", required=True, help="RFC 3339 time, or relative: 15m, 2h, 1d")
    export.add_argument("--to", required=True, type=Path, help="destination directory")
    return parser


def _data_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="where the embedded database and audit log live")


def settings_from(args: argparse.Namespace, environ: dict[str, str]) -> Settings:
    settings = Settings.from_env(environ)
    if getattr(args, "data_dir", None) is not None:
        settings = settings.replace("data_dir", args.data_dir)
    if getattr(args, "bind", None):
        settings = settings.replace("http.binds", tuple(args.bind))
    if getattr(args, "certfile", None) is not None or getattr(args, "keyfile", None) is not None:
        settings = settings.replace("http.certfile", args.certfile).replace("http.keyfile", args.keyfile)
    if getattr(args, "workers", None) is not None:
        if args.workers < 1:
            raise SettingsError("--workers must be at least 1")
        settings = settings.replace("http.workers", args.workers)
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args, dict(os.environ)).validate()
    except (SettingsError, ValueError) as exc:
        print(f"pqmsg: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "serve":
        return run_server(settings)
    if args.command == "migrate":
        return run_migrate(settings)
    return run_audit_export(settings, args.since, args.to)


def run_server(settings: Settings) -> int:
    if settings.http.workers > 1:
        from pqmsg.workers import run_workers

        return run_workers(settings)
    from pqmsg.gctune import tune_for_serving
    from pqmsg.server import serve

    tune_for_serving()
    try:
        trio.run(serve, settings)
    except KeyboardInterrupt:
        return 0
    except BaseException as exc:
        log.critical("pqmsg-server stopped: %s", describe_crash(exc), exc_info=exc)
        return EXIT_CRASH
    return 0


def describe_crash(exc: BaseException) -> str:
    """One line naming the failure, also when it came wrapped in exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe_crash(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def run_migrate(settings: Settings) -> int:
    from pqmsg.storage.migrations_cli import migrate

    version = int(trio.run(migrate, settings))
    print(f"schema at version {version}")
    return 0


def run_audit_export(settings: Settings, since_text: str, to: Path) -> int:
    from pqmsg.audit.segments import export_segments, parse_since

    try:
        since = parse_since(since_text, now=datetime.now(UTC))
    except ValueError as exc:
        print(f"pqmsg: --since: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    copied = export_segments(settings.audit_dir, since=since, to=to)
    for path in copied:
        print(path)
    print(f"exported {len(copied)} segment(s) to {to}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
