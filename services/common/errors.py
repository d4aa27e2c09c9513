"""The one table that maps domain errors (:mod:`raffm.errors`) to gRPC status codes, and the error detail codec.

The chassis interceptor turns a raised domain error into a status code, a status message that says what to fix, and a
``raffm.v1.ErrorDetail`` in trailing metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from raffm.errors import (
    AlreadyExistsError, AuthenticationError, ConfigError, NotFoundError, PermissionDeniedError, PreconditionError,
    ResourceExhaustedError, UnavailableError, ValidationError,
)

# Trailing-metadata key carrying a serialized raffm.v1.ErrorDetail (binary keys must end in "-bin").
ERROR_DETAIL_KEY = "raffm-error-bin"


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
    ErrorMapping(PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    ErrorMapping(ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ErrorMapping(UnavailableError, grpc.StatusCode.UNAVAILABLE),
    ErrorMapping(ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    ErrorMapping(NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
    ErrorMapping(TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    ErrorMapping(ValueError, grpc.StatusCode.INVALID_ARGUMENT),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """(code, message) for a mapped exception, or None when it is unexpected (a bug: INTERNAL)."""
    for entry in ERROR_TABLE:
        if isinstance(entry.exception, type) and isinstance(exc, entry.exception):
            hint = getattr(exc, "hint", "")
            message = str(exc) or type(exc).__name__
            return entry.code, f"{message} ({hint})" if hint else message
    return None


def error_detail_bytes(exc: BaseException) -> bytes:
    """Serialized raffm.v1.ErrorDetail for ``exc``."""
    from raffm.v1 import common_pb2

    return common_pb2.ErrorDetail(
        reason=type(exc).__name__,
        message=str(exc),
        field=getattr(exc, "field", ""),
        hint=getattr(exc, "hint", ""),
    ).SerializeToString()


def parse_error_detail(trailing_metadata: object) -> object | None:
    """The raffm.v1.ErrorDetail in a failed call's trailing metadata, or None; for clients and tests."""
    from raffm.v1 import common_pb2

    entries: tuple[tuple[str, object], ...] = tuple(trailing_metadata or ())  # type: ignore[arg-type]
    for key, value in entries:
        if key == ERROR_DETAIL_KEY and isinstance(value, bytes):
            return common_pb2.ErrorDetail.FromString(value)
    return None
