"""`raffm aggregator serve`: run a federated job (heavy imports happen inside the command)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from raffm.tickets import SECRET_ENV

DEFAULT_PORT = 50053
DEFAULT_METRICS_PORT = 9103


def register(subparsers: Any) -> None:
    from services.aggregator.config import add_job_arguments
    from services.common.cli_args import add_server_arguments, add_store_endpoint_argument

    parser = subparsers.add_parser("aggregator", help="rounds, uploads and sliced FedAvg",
                                   description="The aggregator: runs one federated job as rounds.")
    commands = parser.add_subparsers(dest="aggregator_command", metavar="COMMAND")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    serve = commands.add_parser("serve", help="run the aggregator gRPC server")
    serve.add_argument("--data-dir", default=os.path.join("runs", "aggregator"),
                       help="SQLite database, staging and checkpoints live here (default: %(default)s)")
    serve.add_argument("--db", default="", help="round store URL (default: sqlite under --data-dir)")
    serve.add_argument("--store", default="", help="checkpoint store URL: s3://bucket/prefix (extractors on other hosts "
                                                   "read it), file:///srv/ckpt or a path (default: --data-dir)")
    add_store_endpoint_argument(serve)
    serve.add_argument("--registry", default="127.0.0.1:50051", help="registry host:port (default: %(default)s)")
    serve.add_argument("--extractor", default="",
                       help="extractor host:port that devices are told to download from (default: the one "
                            "each device is configured with); plans are made in-process by the job's strategy")
    serve.add_argument("--ticket-secret", default=os.environ.get(SECRET_ENV, ""),
                       help=f"HMAC secret shared with the extractor (default: ${SECRET_ENV})")
    serve.add_argument("--log-level", default="INFO")
    add_job_arguments(serve)
    add_server_arguments(serve, default_port=DEFAULT_PORT, default_metrics_port=DEFAULT_METRICS_PORT)
    serve.set_defaults(func=_serve)
    migrate = commands.add_parser("migrate", help="apply the round store's schema migrations and exit",
                                  description="Upgrade the aggregator's tables (agg_*) to the latest schema. `serve` "
                                              "does this at start too; run it ahead of a rollout to migrate once.")
    migrate.add_argument("--data-dir", default=os.path.join("runs", "aggregator"),
                         help="where the default SQLite database lives (default: %(default)s)")
    migrate.add_argument("--db", default="", help="round store URL (default: sqlite under --data-dir)")
    migrate.set_defaults(func=_migrate)


def _migrate(args: argparse.Namespace) -> int:
    from services.aggregator.db import DATABASE

    revision = DATABASE.migrate_url(args.db or DATABASE.default_url(args.data_dir))
    print(f"aggregator schema at revision {revision} (head {DATABASE.head_revision()})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from services.aggregator.app import AggregatorConfig, build_aggregator
    from services.aggregator.config import job_from_args
    from services.common.auth import fleet_verifier
    from services.common.cli_args import configure_logging, server_config_from_args

    configure_logging(args.log_level)
    if not args.ticket_secret:
        raise ValueError(f"--ticket-secret (or ${SECRET_ENV}) is required; the extractor needs the same one")
    config = AggregatorConfig(
        job=job_from_args(args), data_dir=args.data_dir, ticket_secret=args.ticket_secret, db_url=args.db,
        store_url=args.store, store_endpoint=args.store_endpoint, registry_target=args.registry, extractor_target=args.extractor,
        operator_token=args.operator_token, server=server_config_from_args(args))

    async def main() -> None:
        app = await build_aggregator(config, verifier=fleet_verifier(config.registry_target, config.operator_token))
        await app.server.serve_until_signal()

    asyncio.run(main())
    return 0
