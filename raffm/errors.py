"""Errors a caller can fix: each names the field at fault and says how to fix it. Pure; no transport.

Use cases (in the core and in the services) raise these with a message that names the offending value; the services'
chassis maps them to gRPC status codes with the one table in ``services/common/errors.py``.
"""

from __future__ import annotations


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
