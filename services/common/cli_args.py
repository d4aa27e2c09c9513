"""Command-line plumbing every service shares: transport flags and their ``ServerConfig``, logging."""

from __future__ import annotations

import argparse
import logging
import os

from services.common.server import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_STREAM_WINDOW_BYTES, MiB, ServerConfig
from services.common.tls import tls_from_flags

OPERATOR_TOKEN_ENV = "RAFFM_OPERATOR_TOKEN"
STORE_ENDPOINT_ENV = "RAFFM_STORE_ENDPOINT"


def add_store_endpoint_argument(parser: argparse.ArgumentParser) -> None:
    """``--store-endpoint``: the S3 API endpoint of an ``s3://`` checkpoint store (MinIO, Ceph RGW, ...)."""
    parser.add_argument("--store-endpoint", default=os.environ.get(STORE_ENDPOINT_ENV, ""),
                        help="endpoint URL of an s3:// --store that is not AWS S3, e.g. http://minio:9000 "
                             f"(default: ${STORE_ENDPOINT_ENV}; credentials from AWS_ACCESS_KEY_ID/"
                             "AWS_SECRET_ACCESS_KEY)")


def add_server_arguments(parser: argparse.ArgumentParser, *, default_port: int, default_metrics_port: int) -> None:
    """Add --host/--port/--metrics-port/--tls-*/--insecure/--grace-s/--max-message-mb/--stream-window-kib/
    --operator-token."""
    group = parser.add_argument_group("transport")
    group.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    group.add_argument("--port", type=int, default=default_port, help="gRPC port; 0 picks one (default: %(default)s)")
    group.add_argument("--metrics-port", type=int, default=default_metrics_port,
                       help="Prometheus /metrics port; 0 picks one, -1 disables it (default: %(default)s)")
    group.add_argument("--port-file", help="once serving, write the bound ports here as JSON, "
                       '{"grpc": PORT, "metrics": PORT or null}: how a caller learns the ports picked for --port 0 '
                       "and --metrics-port 0")
    group.add_argument("--metrics-host", default="127.0.0.1", help="/metrics bind address (default: %(default)s)")
    group.add_argument("--tls-cert", help="PEM server certificate (enables TLS)")
    group.add_argument("--tls-key", help="PEM private key of --tls-cert")
    group.add_argument("--tls-ca", help="PEM CA bundle; clients must present a certificate it signed (mTLS)")
    group.add_argument("--insecure", action="store_true",
                       help="allow plaintext on a non-loopback address (never in production)")
    group.add_argument("--grace-s", type=float, default=10.0,
                       help="on SIGTERM/SIGINT, let in-flight calls finish for this long (default: %(default)s)")
    group.add_argument("--max-message-mb", type=int, default=DEFAULT_MAX_MESSAGE_BYTES // MiB,
                       help="gRPC send/receive message limit, MiB (default: %(default)s)")
    group.add_argument("--stream-window-kib", type=int, default=DEFAULT_STREAM_WINDOW_BYTES // 1024,
                       help="data one stream may have in flight before the service reads it, KiB: bounds the memory "
                            "of concurrent uploads (about streams x window); a stream moves at most window / "
                            "round-trip time (default: %(default)s)")
    group.add_argument("--operator-token", default=os.environ.get(OPERATOR_TOKEN_ENV, ""),
                       help=f"token for operators and other services (default: ${OPERATOR_TOKEN_ENV})")


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The ServerConfig the flags describe; raises ConfigError for inconsistent TLS flags."""
    return ServerConfig(
        host=args.host,
        port=args.port,
        tls=tls_from_flags(args.tls_cert, args.tls_key, args.tls_ca),
        insecure=args.insecure,
        max_message_bytes=args.max_message_mb * MiB,
        stream_window_bytes=args.stream_window_kib * 1024,
        grace_s=args.grace_s,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        metrics_host=args.metrics_host,
        port_file=args.port_file,
    )


def configure_logging(level: str) -> None:
    """Log lines with time, level and logger name at ``level`` (a name like ``INFO``)."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
