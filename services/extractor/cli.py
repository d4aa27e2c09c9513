"""`raffm extractor serve`: plans and streamed slices (heavy imports happen inside the command)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from raffm.tickets import SECRET_ENV

DEFAULT_PORT = 50052
DEFAULT_METRICS_PORT = 9102


def register(subparsers: Any) -> None:
    from services.common.cli_args import add_server_arguments, add_store_endpoint_argument

    parser = subparsers.add_parser("extractor", help="sub-model plans and streamed weight slices",
                                   description="The extractor: fits sub-models to devices and streams their slices.")
    commands = parser.add_subparsers(dest="extractor_command", metavar="COMMAND")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    serve = commands.add_parser("serve", help="run the extractor gRPC server")
    serve.add_argument("--store", default=os.path.join("runs", "aggregator", "checkpoints"),
                       help="checkpoint store the aggregator writes: s3://bucket/prefix (replicas on any hosts), "
                            "file:///dir or a path (default: %(default)s)")
    add_store_endpoint_argument(serve)
    serve.add_argument("--registry", default="127.0.0.1:50051", help="registry host:port (default: %(default)s)")
    serve.add_argument("--ticket-secret", default=os.environ.get(SECRET_ENV, ""),
                       help=f"HMAC secret shared with the aggregator (default: ${SECRET_ENV})")
    serve.add_argument("--cache-entries", type=int, default=8, help="slices kept in the LRU cache")
    serve.add_argument("--cache-mb", type=int, default=4096, help="slice cache byte bound, MiB")
    serve.add_argument("--log-level", default="INFO")
    add_server_arguments(serve, default_port=DEFAULT_PORT, default_metrics_port=DEFAULT_METRICS_PORT)
    serve.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from services.common.auth import fleet_verifier
    from services.common.cli_args import configure_logging, server_config_from_args
    from services.extractor.app import ExtractorConfig, build_extractor

    configure_logging(args.log_level)
    if not args.ticket_secret:
        raise ValueError(f"--ticket-secret (or ${SECRET_ENV}) is required; the aggregator signs with the same one")
    config = ExtractorConfig(store_url=args.store, store_endpoint=args.store_endpoint, ticket_secret=args.ticket_secret, cache_entries=args.cache_entries,
                             cache_mb=args.cache_mb, server=server_config_from_args(args))

    async def main() -> None:
        app = await build_extractor(config, verifier=fleet_verifier(args.registry, args.operator_token))
        await app.server.serve_until_signal()

    asyncio.run(main())
    return 0
