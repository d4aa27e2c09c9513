"""The chassis interceptor: authentication, domain-error mapping and RPC metrics around every handler.

It wraps each method handler so that, inside the RPC's own task:
1. the bearer token is verified (unless the method is public) and the principal set for ``current_principal()``;
2. a ``DomainError`` (or other mapped exception) becomes its status code from ``ERROR_TABLE`` with a message that
   says what to fix, plus an ``ErrorDetail`` in trailing metadata; an unexpected exception becomes INTERNAL;
3. the call's count and latency are recorded by method and final status code.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import asynccontextmanager
from typing import Any

import grpc

from services.common.auth import TokenVerifier, bearer_token, reset_principal, set_principal, verify_or_raise
from services.common.errors import ERROR_DETAIL_KEY, error_detail_bytes, status_for
from services.common.metrics import RpcMetrics

log = logging.getLogger(__name__)

# Infrastructure services that never need a token.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class ChassisInterceptor(grpc.aio.ServerInterceptor):
    """Auth + error mapping + metrics. ``verifier=None`` disables authentication (tests of the chassis only)."""

    def __init__(
        self,
        *,
        verifier: TokenVerifier | None,
        public_methods: Collection[str] = (),
        metrics: RpcMetrics | None = None,
    ) -> None:
        self._verifier = verifier
        self._public = frozenset(public_methods)
        self._metrics = metrics

    def is_public(self, method: str) -> bool:
        return method in self._public or method.startswith(PUBLIC_PREFIXES)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        token = bearer_token(handler_call_details.invocation_metadata)
        needs_auth = self._verifier is not None and not self.is_public(method)

        @asynccontextmanager
        async def scope(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            async with self._call_scope(method, token, needs_auth, context):
                yield

        return _wrap_handler(handler, scope)

    @asynccontextmanager
    async def _call_scope(
        self, method: str, token: str | None, needs_auth: bool, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        start = time.perf_counter()
        recorded = False

        def record(code: grpc.StatusCode) -> None:
            # Recorded before the status is sent, so a client that saw the status also sees it counted.
            nonlocal recorded
            if self._metrics is not None and not recorded:
                self._metrics.observe(method, code.name, time.perf_counter() - start)
            recorded = True

        principal_token = None
        try:
            if needs_auth:
                assert self._verifier is not None
                principal_token = set_principal(await verify_or_raise(self._verifier, token), token)
            yield
            record(_context_code(context) or grpc.StatusCode.OK)
        except grpc.aio.AbortError:  # the servicer aborted itself; its code is on the context
            record(_context_code(context) or grpc.StatusCode.UNKNOWN)
            raise
        except asyncio.CancelledError:
            record(grpc.StatusCode.CANCELLED)
            raise
        except Exception as exc:  # noqa: BLE001 - every exception leaves as a status
            mapped = status_for(exc)
            if mapped is None:
                log.exception("unexpected error in %s", method)
                record(grpc.StatusCode.INTERNAL)
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")
            else:
                code, message = mapped
                record(code)
                context.set_trailing_metadata(((ERROR_DETAIL_KEY, error_detail_bytes(exc)),))
                await context.abort(code, message)
        finally:
            if principal_token is not None:
                reset_principal(principal_token)


def _context_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode | None:
    """The code a servicer set with ``set_code``/``abort``, as a ``grpc.StatusCode`` (None if unset)."""
    code = context.code()
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    for member in grpc.StatusCode:  # some grpc versions return the raw integer
        if member.value[0] == code:
            return member
    return None


Scope = Callable[[grpc.aio.ServicerContext], Any]


def _wrap_handler(handler: grpc.RpcMethodHandler, scope: Scope) -> grpc.RpcMethodHandler:
    """The same handler with every behavior run inside ``scope(context)``."""

    def unary_response(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with scope(context):
                return await behavior(request, context)

        return wrapped

    def stream_response(behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with scope(context):
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:  # a coroutine that writes with context.write()
                    await result

        return wrapped

    kwargs = dict(
        request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_response(handler.unary_unary), **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_response(handler.stream_unary), **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream_response(handler.unary_stream), **kwargs)
    return grpc.stream_stream_rpc_method_handler(stream_response(handler.stream_stream), **kwargs)
