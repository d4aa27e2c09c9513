"""Composition root of the extractor: checkpoint store, planner, slice cache, servicer, server."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from raffm.checkpoints import checkpoint_store_from_url
from raffm.chunkwire import DOWNLOAD
from raffm.planning import LocalPlanner
from raffm.tickets import TicketSigner
from services.common.auth import TokenVerifier
from services.common.server import ChassisServer, ServerConfig, bind, build_server
from services.extractor.metrics import build_extractor_metrics
from services.extractor.servicer import SERVICE, ExtractorServicer
from services.extractor.slices import SliceCache, SliceService


@dataclass(frozen=True)
class ExtractorConfig:
    store_url: str
    ticket_secret: str
    store_endpoint: str = ""  # S3 API endpoint of an s3:// store (empty: AWS, or AWS_ENDPOINT_URL_S3)
    cache_entries: int = 8
    cache_mb: int = 4096
    server: ServerConfig = field(default_factory=ServerConfig)


@dataclass
class ExtractorApp:
    server: ChassisServer
    service: SliceService

    @property
    def address(self) -> str:
        return self.server.address


async def build_extractor(config: ExtractorConfig, *, verifier: TokenVerifier | None,
                          registry: CollectorRegistry | None = None) -> ExtractorApp:
    """Assemble the extractor inside a running event loop (nothing is built at import time)."""
    registry = registry if registry is not None else CollectorRegistry()
    store = await asyncio.to_thread(checkpoint_store_from_url, config.store_url, endpoint=config.store_endpoint)
    service = SliceService(store, TicketSigner(config.ticket_secret), LocalPlanner(store),
                           build_extractor_metrics(registry),
                           SliceCache(config.cache_entries, config.cache_mb << 20))
    servicer = ExtractorServicer(service)
    binding = bind(SERVICE, servicer, codecs={"DownloadSlice": DOWNLOAD})
    server = build_server(config.server, [binding], verifier=verifier, registry=registry)
    return ExtractorApp(server, service)
