"""Bearer-token authentication shared by every service.

A ``TokenVerifier`` turns a bearer token into a ``Principal`` (or None). The registry verifies device tokens against
its own database; the aggregator and extractor use ``RemoteRegistryVerifier`` (the registry's VerifyToken RPC, with a
cache of at most ``REMOTE_TOKEN_CACHE_S``, so a revoked device is refused everywhere within that time) chained with a
``StaticTokenVerifier`` for operator/service tokens; while the registry's revocation feed is open
(``RevocationWatcher``), answers are reused for up to ``FEED_TOKEN_CACHE_S`` and a revoked device's are dropped as the
registry revokes it. The chassis interceptor calls the verifier and makes the
principal available to servicers through ``current_principal()``; a long call can ask again before it commits
(``reverify``).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from raffm.errors import AuthenticationError, PermissionDeniedError, excerpt

log = logging.getLogger(__name__)

TOKEN_PREFIX = "rfm_"
AUTH_HEADER = "authorization"
# How long the aggregator and extractor reuse the registry's answer about a device token: the bound on how long a
# deregistered (revoked) device keeps access to them while they do not hear of revocations from the registry.
REMOTE_TOKEN_CACHE_S = 1.0
# The same while the registry's revocation feed is live: a revocation reaches them at once, so this bound only holds
# for one the feed cannot see (made through another registry process). At a thousand devices polling every 5 s it
# spares the registry ~200 VerifyToken calls a second.
FEED_TOKEN_CACHE_S = 60.0


@dataclass(frozen=True)
class Principal:
    """Who is calling: a device (subject = device id) or an operator/service (``is_operator``)."""

    subject: str
    fleet: str = ""
    is_operator: bool = False

    @property
    def device_id(self) -> str | None:
        return None if self.is_operator else self.subject


class TokenVerifier(Protocol):
    """Resolve a bearer token; None means unknown or revoked."""

    async def verify(self, token: str) -> Principal | None: ...


def new_token() -> str:
    """A fresh random bearer token (256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """What is stored instead of a token: hex SHA-256 (tokens are random, so no salt or slow hash is needed)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, or None."""
    for key, value in metadata or ():
        if key.lower() != AUTH_HEADER or not isinstance(value, str):
            continue
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that authenticates with ``token``; for clients."""
    return ((AUTH_HEADER, f"Bearer {token}"),)


class StaticTokenVerifier:
    """Fixed operator/service tokens (from flags or environment), compared in constant time."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        """``tokens`` maps operator name -> token; empty tokens are ignored."""
        self._by_hash = {hash_token(tok): name for name, tok in tokens.items() if tok}

    async def verify(self, token: str) -> Principal | None:
        digest = hash_token(token)
        for known, name in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return Principal(subject=name, is_operator=True)
        return None


class ChainedTokenVerifier:
    """First verifier that knows the token wins."""

    def __init__(self, verifiers: Sequence[TokenVerifier]) -> None:
        self._verifiers = tuple(verifiers)

    async def verify(self, token: str) -> Principal | None:
        for verifier in self._verifiers:
            principal = await verifier.verify(token)
            if principal is not None:
                return principal
        return None


class CachingTokenVerifier:
    """Caches positive answers for ``ttl_s`` seconds (bounded LRU); unknown tokens are always re-checked.

    An answer that was being fetched while anything was invalidated is returned but not kept: it may predate the
    revocation that caused the invalidation.
    """

    def __init__(
        self, inner: TokenVerifier, ttl_s: float = 30.0, max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner, self.ttl_s, self._max, self._clock = inner, ttl_s, max_entries, clock
        self._cache: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        self._generation = 0  # invalidations so far

    def invalidate(self, token: str | None = None) -> None:
        """Forget one token (e.g. after revocation) or all of them."""
        self._generation += 1
        if token is None:
            self._cache.clear()
        else:
            self._cache.pop(hash_token(token), None)

    def invalidate_subject(self, subject: str) -> None:
        """Forget every cached token of one device (its tokens were revoked)."""
        self._generation += 1
        for key in [k for k, (_, p) in self._cache.items() if p.subject == subject]:
            del self._cache[key]

    async def verify(self, token: str) -> Principal | None:
        key = hash_token(token)
        hit = self._cache.get(key)
        now = self._clock()
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(key)
            return hit[1]
        generation = self._generation
        principal = await self._inner.verify(token)
        if principal is not None and generation == self._generation:
            self._cache[key] = (now + self.ttl_s, principal)
            self._cache.move_to_end(key)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return principal


class RemoteRegistryVerifier:
    """Device tokens checked by the registry's VerifyToken RPC; for the aggregator and extractor.

    ``channel`` is a ``grpc.aio.Channel`` to the registry; ``service_token`` an operator token the registry accepts.
    Wrap it in ``CachingTokenVerifier`` so each RPC does not cost a registry round trip.
    """

    def __init__(self, channel: Any, service_token: str, timeout_s: float = 5.0) -> None:
        from raffm.v1 import registry_pb2_grpc

        self._stub = registry_pb2_grpc.RegistryServiceStub(channel)
        self._metadata = auth_metadata(service_token)
        self._timeout = timeout_s

    async def verify(self, token: str) -> Principal | None:
        import grpc

        from raffm.v1 import registry_pb2
        from services.common.errors import busy

        try:
            reply = await self._stub.VerifyToken(
                registry_pb2.VerifyTokenRequest(token=token), metadata=self._metadata, timeout=self._timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND):
                return None
            if (error := busy(exc, "the registry could not check this token")) is not None:
                raise error from None
            raise
        return Principal(subject=reply.device_id, fleet=reply.fleet)


class RevocationWatcher:
    """Keeps a cache of the registry's VerifyToken answers in step with its revocation feed (WatchRevocations).

    While the feed is live (the stream open and synced) the cache reuses answers for ``live_ttl_s`` and forgets a
    device's as the registry revokes it. Whenever it is not, the cache forgets every answer and reuses them for
    ``cache``'s own TTL only; the watcher reconnects with backoff. A registry without the feed (UNIMPLEMENTED) is not
    watched again.
    """

    def __init__(self, channel: Any, service_token: str, cache: CachingTokenVerifier,
                 live_ttl_s: float = FEED_TOKEN_CACHE_S, backoff_s: tuple[float, float] = (0.5, 30.0)) -> None:
        from raffm.v1 import registry_pb2_grpc

        self._stub = registry_pb2_grpc.RegistryServiceStub(channel)
        self._metadata = auth_metadata(service_token)
        self._cache, self._live_ttl, self._backoff = cache, live_ttl_s, backoff_s
        self._fallback_ttl = cache.ttl_s
        self._task: asyncio.Task[None] | None = None
        self.live = False

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="revocation-feed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        import grpc

        from raffm.v1 import registry_pb2

        delay = self._backoff[0]
        while True:
            try:
                async for event in self._stub.WatchRevocations(registry_pb2.WatchRevocationsRequest(),
                                                               metadata=self._metadata):
                    if event.synced:
                        self._cache.invalidate()  # answers from before the feed was live may predate a revocation
                        self._cache.ttl_s, self.live, delay = self._live_ttl, True, self._backoff[0]
                        log.info("registry revocation feed live: device tokens re-checked every %g s",
                                 self._live_ttl)
                    elif event.device_id:
                        self._cache.invalidate_subject(event.device_id)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.warning("the registry has no revocation feed; device tokens are re-checked every %g s",
                                self._fallback_ttl)
                    return
                log.info("registry revocation feed unavailable (%s); retrying in %g s", exc.code().name, delay)
            except Exception:  # noqa: BLE001 - the feed is an optimization: keep verifying without it, keep retrying
                log.exception("registry revocation feed failed; retrying in %g s", delay)
            finally:
                if self.live:
                    self._cache.ttl_s, self.live = self._fallback_ttl, False
                    self._cache.invalidate()
            await asyncio.sleep(delay)
            delay = min(2 * delay, self._backoff[1])


class FleetVerifier(ChainedTokenVerifier):
    """What the aggregator and extractor accept (see :func:`fleet_verifier`); the server that uses it starts and stops
    its ``watcher``."""

    def __init__(self, verifiers: Sequence[TokenVerifier], watcher: RevocationWatcher | None) -> None:
        super().__init__(verifiers)
        self.watcher = watcher

    async def start(self) -> None:
        if self.watcher is not None:
            await self.watcher.start()

    async def close(self) -> None:
        if self.watcher is not None:
            await self.watcher.close()


def fleet_verifier(registry_target: str, operator_token: str, cache_s: float = REMOTE_TOKEN_CACHE_S,
                   live_cache_s: float = FEED_TOKEN_CACHE_S) -> FleetVerifier:
    """What the aggregator and extractor accept: the operator/service token, then device tokens checked by the
    registry (each answer reused for ``cache_s``, or ``live_cache_s`` while the registry's revocation feed is live).
    Call inside the event loop (it opens a ``grpc.aio`` channel)."""
    import grpc

    verifiers: list[TokenVerifier] = [StaticTokenVerifier({"operator": operator_token})]
    watcher = None
    if registry_target:
        channel = grpc.aio.insecure_channel(registry_target)
        cache = CachingTokenVerifier(RemoteRegistryVerifier(channel, operator_token), ttl_s=cache_s)
        verifiers.append(cache)
        watcher = RevocationWatcher(channel, operator_token, cache, live_ttl_s=live_cache_s)
    return FleetVerifier(verifiers, watcher)


class RevokedError(AuthenticationError):
    """The caller's token was revoked (its device deregistered) while the call was in progress."""

    reason = "revoked"
    default_hint = "the device was deregistered; register again to take part"


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("raffm_principal", default=None)
_current_token: contextvars.ContextVar[str | None] = contextvars.ContextVar("raffm_token", default=None)


def current_principal() -> Principal:
    """The authenticated caller of the RPC being served (set by the chassis interceptor)."""
    principal = _current.get()
    if principal is None:
        raise AuthenticationError("this call is not authenticated")
    return principal


def set_principal(principal: Principal | None, token: str | None = None) -> contextvars.Token[Principal | None]:
    _current_token.set(token)
    return _current.set(principal)


async def reverify(verifier: TokenVerifier | None) -> None:
    """Check the current call's token again (e.g. before committing what a long stream sent): RevokedError when it
    was revoked since the call began. Nothing to check without a verifier or a token (authentication is off)."""
    token = _current_token.get()
    if verifier is None or token is None:
        return
    if await verifier.verify(token) is None:
        raise RevokedError("this device's token was revoked while the call was in progress")


def reset_principal(token: contextvars.Token[Principal | None]) -> None:
    try:
        _current.reset(token)
    except ValueError:  # finalized in another context (async generator closed elsewhere): nothing to restore
        pass


def authorize_device(principal: Principal, device_id: str) -> None:
    """Allow operators, and a device acting on itself; anything else is PERMISSION_DENIED."""
    if principal.is_operator or principal.subject == device_id:
        return
    raise PermissionDeniedError(f"this token belongs to device {excerpt(principal.subject)}, not {excerpt(device_id)}",
                                field="device_id")


def require_operator(principal: Principal, what: str) -> None:
    """Fleet-wide calls need an operator/service token."""
    if not principal.is_operator:
        raise PermissionDeniedError(f"{what} needs an operator or service token; device tokens cannot call it",
                                    hint="call it with the operator token the server was started with")


async def verify_or_raise(verifier: TokenVerifier, token: str | None) -> Principal:
    """The principal for ``token``, or AuthenticationError naming what is wrong."""
    if token is None:
        raise AuthenticationError("missing credentials: no 'authorization: Bearer <token>' metadata")
    principal = await verifier.verify(token)
    if principal is None:
        raise AuthenticationError("invalid token: unknown or revoked",
                                  hint="register again to obtain a token, or check the operator token")
    return principal


__all__ = [
    "AUTH_HEADER", "CachingTokenVerifier", "ChainedTokenVerifier", "FEED_TOKEN_CACHE_S", "FleetVerifier", "Principal",
    "REMOTE_TOKEN_CACHE_S", "RemoteRegistryVerifier", "RevocationWatcher", "RevokedError", "StaticTokenVerifier",
    "TokenVerifier", "auth_metadata",
    "authorize_device", "bearer_token", "current_principal", "hash_token", "new_token", "require_operator", "reverify",
    "verify_or_raise",
]
