"""The one table that maps domain errors (:mod:`raffm.errors`) to gRPC status codes, and the error detail codec.

The chassis interceptor turns a raised domain error into a status code, a status message that says what to fix, and a
``raffm.v1.ErrorDetail`` in trailing metadata. Both travel in HTTP/2 trailers, which clients cap at a few KiB (a longer
status reaches the client as RESOURCE_EXHAUSTED instead of the real code), so every text is bounded here, whatever
the code that raised it quoted.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from raffm.errors import (
    AlreadyExistsError, AuthenticationError, ConfigError, ConflictError, NotFoundError, PermissionDeniedError, PreconditionError,
    ResourceExhaustedError, UnavailableError, ValidationError,
)

# Trailing-metadata key carrying a serialized raffm.v1.ErrorDetail (binary keys must end in "-bin").
ERROR_DETAIL_KEY = "raffm-error-bin"
# Bounds of what an error sends back: message and hint, and the field path. The status message plus the base64 of the
# detail stay well under the 8 KiB of metadata gRPC clients accept by default.
MAX_MESSAGE_CHARS = 1024
MAX_FIELD_CHARS = 128


def bounded(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters cut]"


@dataclass(frozen=True)
class ErrorMapping:
    exception: type[BaseException]
    code: grpc.StatusCode


# Most specific first: the first entry the exception is an instance of wins. ValueError comes last so library code that
# validates with plain ValueError (message naming the value) still maps to INVALID_ARGUMENT.
ERROR_TABLE: tuple[ErrorMapping, ...] = (
    ErrorMapping(ValidationError, grpc.StatusCode.INVALID_ARGUMENT),
    ErrorMapping(AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    ErrorMapping(PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    ErrorMapping(NotFoundError, grpc.StatusCode.NOT_FOUND),
    ErrorMapping(AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    ErrorMapping(ConflictError, grpc.StatusCode.ABORTED),
    ErrorMapping(PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    ErrorMapping(ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ErrorMapping(UnavailableError, grpc.StatusCode.UNAVAILABLE),
    ErrorMapping(ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    ErrorMapping(NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
    ErrorMapping(TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    ErrorMapping(ValueError, grpc.StatusCode.INVALID_ARGUMENT),
)


# A dependency that answered one of these could answer in a moment: the caller's call fails UNAVAILABLE (which clients
# retry with backoff), not INTERNAL (which says the server has a bug).
BUSY_CODES = frozenset({grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE,
                        grpc.StatusCode.RESOURCE_EXHAUSTED})


def busy(exc: grpc.aio.AioRpcError, what: str) -> UnavailableError | None:
    """An UnavailableError saying that ``what`` failed, when ``exc`` (a call to another service) has a BUSY_CODES
    code; None otherwise (the caller re-raises)."""
    if exc.code() not in BUSY_CODES:
        return None
    return UnavailableError(f"{what}: {exc.code().name} ({(exc.details() or '')[:200]})")


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """(code, message) for a mapped exception, or None when it is unexpected (a bug: INTERNAL)."""
    for entry in ERROR_TABLE:
        if isinstance(entry.exception, type) and isinstance(exc, entry.exception):
            hint = bounded(getattr(exc, "hint", ""), MAX_MESSAGE_CHARS // 4)
            message = bounded(str(exc) or type(exc).__name__)
            return entry.code, f"{message} ({hint})" if hint else message
    return None


def error_detail_bytes(exc: BaseException) -> bytes:
    """Serialized raffm.v1.ErrorDetail for ``exc``."""
    from raffm.v1 import common_pb2

    return common_pb2.ErrorDetail(
        reason=type(exc).__name__,
        message=bounded(str(exc)),
        field=bounded(getattr(exc, "field", ""), MAX_FIELD_CHARS),
        hint=bounded(getattr(exc, "hint", ""), MAX_MESSAGE_CHARS // 4),
        reject_reason=reject_reason(exc),
    ).SerializeToString()


def reject_reason(exc: BaseException) -> str:
    """The one-word reason a refused update or ticket carries (its ``reason`` attribute), or ""."""
    reason = getattr(exc, "reason", "")
    return bounded(reason, MAX_FIELD_CHARS) if isinstance(reason, str) else ""


def parse_error_detail(trailing_metadata: object) -> object | None:
    """The raffm.v1.ErrorDetail in a failed call's trailing metadata, or None; for clients and tests."""
    from raffm.v1 import common_pb2

    entries: tuple[tuple[str, object], ...] = tuple(trailing_metadata or ())  # type: ignore[arg-type]
    for key, value in entries:
        if key == ERROR_DETAIL_KEY and isinstance(value, bytes):
            return common_pb2.ErrorDetail.FromString(value)
    return None
