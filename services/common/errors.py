"""Domain errors and the one table that maps them to gRPC status codes.

Use cases raise these exceptions with a message that names the offending value; the chassis interceptor turns them
into a status code, a status message that says what to fix, and a ``raffm.v1.ErrorDetail`` in trailing metadata.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

# Trailing-metadata key carrying a serialized raffm.v1.ErrorDetail (binary keys must end in "-bin").
ERROR_DETAIL_KEY = "raffm-error-bin"


class DomainError(Exception):
    """Base of every error a caller can fix; ``field`` names the request field at fault, ``hint`` the fix."""

    default_hint = ""

    def __init__(self, message: str, *, field: str = "", hint: str = "") -> None:
        super().__init__(message)
        self.field = field
        self.hint = hint or self.default_hint


class ValidationError(DomainError, ValueError):
    """A request value is malformed or out of range."""

    default_hint = "correct the named field and retry"


class AuthenticationError(DomainError):
    """No credentials, or credentials nobody issued (missing/unknown token, wrong enrollment key)."""

    default_hint = "send metadata 'authorization: Bearer <token>' with the token Register returned"


class PermissionDeniedError(DomainError):
    """Valid credentials, used on a resource they do not cover (e.g. another device)."""

    default_hint = "a device token may only act on its own device; use an operator token for fleet-wide calls"


class NotFoundError(DomainError):
    """The named resource does not exist."""

    default_hint = "check the id; list the resources to see what exists"


class AlreadyExistsError(DomainError):
    """Creating something that already exists."""

    default_hint = "pick another name, or re-register with the existing device's token"


class PreconditionError(DomainError):
    """The system is not in a state that allows the call (e.g. a round already closed)."""

    default_hint = "re-read the resource's state before retrying"


class ResourceExhaustedError(DomainError):
    """A quota or size limit was hit."""

    default_hint = "retry later or with a smaller request"


class UnavailableError(DomainError):
    """A dependency is temporarily unavailable; retrying with backoff is safe."""

    default_hint = "retry with exponential backoff"


class ConfigError(DomainError, ValueError):
    """Invalid server configuration (flags, URLs, certificates); raised at start-up, never per call."""

    default_hint = "fix the named flag and restart"


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
