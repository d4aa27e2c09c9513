"""Errors a caller can fix: each names the field at fault and says how to fix it. Pure; no transport.

Use cases (in the core and in the services) raise these with a message that names the offending value; the services'
chassis maps them to gRPC status codes with the one table in ``services/common/errors.py``.
"""

from __future__ import annotations

# Error messages quote what they reject, but never more than this many characters of it: a status message travels in
# HTTP/2 trailers (a few KiB at most), and a log line that echoes a 10 MB field helps nobody.
EXCERPT_CHARS = 80


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters with the full length said, for error messages and logs."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else (
        f"{len(value)} bytes" if isinstance(value, bytes | bytearray) else f"{len(text)} characters as text")
    return f"{text[:limit]}... ({size})"


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


class ConflictError(DomainError):
    """Another call is working on the same resource right now (e.g. a second upload stream on one ticket)."""

    default_hint = "wait for the other call to end, then retry"


class ResourceExhaustedError(DomainError):
    """A quota or size limit was hit."""

    default_hint = "retry later or with a smaller request"


class UnavailableError(DomainError):
    """A dependency is temporarily unavailable; retrying with backoff is safe."""

    default_hint = "retry with exponential backoff"


class ConfigError(DomainError, ValueError):
    """Invalid server configuration (flags, URLs, certificates); raised at start-up, never per call."""

    default_hint = "fix the named flag and restart"
