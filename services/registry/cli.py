"""`raffm registry serve|migrate`: the registry's command line (heavy imports happen inside the commands)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9101
DEFAULT_DATA_DIR = os.path.join("runs", "registry")
ENROLL_KEY_ENV = "RAFFM_ENROLL_KEY"


def register(subparsers: Any) -> None:
    """Add the ``registry`` sub-command with ``serve`` and ``migrate``."""
    from services.common.cli_args import add_server_arguments  # light: argparse helpers only

    parser = subparsers.add_parser("registry", help="device registry service",
                                   description="The device registry: enrollment, profiles, liveness.")
    commands = parser.add_subparsers(dest="registry_command", metavar="COMMAND")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)

    serve = commands.add_parser("serve", help="run the registry gRPC server")
    _add_db_arguments(serve)
    serve.add_argument("--enroll-key", default=os.environ.get(ENROLL_KEY_ENV, ""),
                       help=f"fleet enrollment key devices register with (default: ${ENROLL_KEY_ENV})")
    serve.add_argument("--fleet", default="default", help="fleet the enrollment key admits to (default: %(default)s)")
    serve.add_argument("--liveness-window-s", type=float, default=90.0,
                       help="devices silent this long are marked offline (default: %(default)s)")
    serve.add_argument("--heartbeat-flush-s", type=float, default=0.5,
                       help="write heartbeats to the database in one batch this often; a crash loses at most this "
                            "much of last-seen times (0: one transaction per heartbeat; default: %(default)s)")
    serve.add_argument("--token-cache-ttl-s", type=float, default=5.0,
                       help="reuse a verified device token this long without reading the database; deregistration "
                            "evicts it at once (0: verify every call; default: %(default)s)")
    serve.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    add_server_arguments(serve, default_port=DEFAULT_PORT, default_metrics_port=DEFAULT_METRICS_PORT)
    serve.set_defaults(func=_with_hints(_serve))

    migrate = commands.add_parser("migrate", help="apply database schema migrations and exit")
    _add_db_arguments(migrate)
    migrate.set_defaults(func=_with_hints(_migrate))


def _with_hints(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Configuration errors leave as ValueError (exit 2 in raffm_app.cli) with their fix in the message."""

    def run(args: argparse.Namespace) -> int:
        from raffm.errors import DomainError

        try:
            return func(args)
        except DomainError as exc:
            raise ValueError(f"{exc} ({exc.hint})" if exc.hint else str(exc)) from exc

    return run


def _add_db_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default="", help="database URL: sqlite:///path.db or postgresql+psycopg://... "
                                                 "(default: sqlite under --data-dir)")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="where the default SQLite file lives "
                                                                     "(default: %(default)s)")


def _db_url(args: argparse.Namespace) -> str:
    from services.registry.db import DATABASE

    return args.db or DATABASE.default_url(args.data_dir)


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from services.common.cli_args import configure_logging, server_config_from_args
    from services.registry.app import RegistryConfig, build_registry

    configure_logging(args.log_level)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # one line of our own says which revision is live
    if not args.enroll_key:
        raise ValueError(f"--enroll-key (or ${ENROLL_KEY_ENV}) is required: devices register with it")
    config = RegistryConfig(
        db_url=_db_url(args), enroll_key=args.enroll_key, fleet=args.fleet, operator_token=args.operator_token,
        liveness_window_s=args.liveness_window_s, heartbeat_flush_s=args.heartbeat_flush_s,
        token_cache_ttl_s=args.token_cache_ttl_s, server=server_config_from_args(args),
    )

    async def main() -> None:
        app = await build_registry(config)
        await app.server.serve_until_signal()

    asyncio.run(main())
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from services.registry.db import DATABASE

    revision = DATABASE.migrate_url(_db_url(args))
    print(f"registry schema at revision {revision} (head {DATABASE.head_revision()})")
    return 0
