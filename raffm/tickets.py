"""Signed assignment tickets: HMAC-SHA256 over the device, round, model version (and a LoRA round's base version),
spec and recipe (pure; no IO).

The aggregator signs a ticket when it hands out an assignment; the extractor verifies it before streaming a slice and
the aggregator verifies it again on upload. Both share the secret. A ticket is opaque bytes:
``rft1.<base64url(JSON payload)>.<base64url(HMAC-SHA256(secret, "rft1." + payload))>``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from raffm.recipe import Recipe
from raffm.spec import ElasticSpec

# The aggregator signs tickets and the extractor verifies them with this shared secret.
SECRET_ENV = "RAFFM_TICKET_SECRET"

PREFIX = b"rft1."
MIN_SECRET_BYTES = 16
MAX_TICKET_BYTES = 16 * 1024


class TicketError(ValueError):
    """A ticket cannot be trusted; the message says why."""


class TicketMalformedError(TicketError):
    pass


class TicketSignatureError(TicketError):
    """The HMAC does not match: the ticket was altered or signed with another secret."""


class TicketExpiredError(TicketError):
    pass


@dataclass(frozen=True)
class Ticket:
    """What an assignment entitles a device to. ``spec`` is ``ElasticSpec.to_dict()``; ``expires_at`` is epoch s."""

    ticket_id: str
    device_id: str
    job_id: str
    round_id: str
    model_version: str
    spec_key: str
    spec: dict[str, Any]
    wire_dtype: str
    issued_at: float
    expires_at: float
    tier: str = ""  # device class, for metrics labels only
    recipe: dict[str, Any] = field(default_factory=dict)  # Recipe.to_dict(): what the device trains in the slice
    # LoRA rounds: the version whose slice is the device's frozen base (the job's version 0); the download adds the
    # adapters that carry ``model_version - base_version``. Empty: plain fine-tuning.
    base_version: str = ""

    @property
    def elastic_spec(self) -> ElasticSpec:
        return ElasticSpec.from_dict(self.spec)

    @property
    def training_recipe(self) -> Recipe:
        return Recipe.from_dict(self.recipe)

    @classmethod
    def create(
        cls, *, device_id: str, job_id: str, round_id: str, model_version: str, spec: ElasticSpec, wire_dtype: str,
        ttl_s: float, now: float | None = None, ticket_id: str | None = None, tier: str = "",
        recipe: Recipe | None = None, base_version: str = "",
    ) -> Ticket:
        issued = time.time() if now is None else now
        return cls(
            ticket_id=ticket_id or secrets.token_hex(12), device_id=device_id, job_id=job_id, round_id=round_id,
            model_version=model_version, spec_key=spec.key(), spec=spec.to_dict(), wire_dtype=wire_dtype,
            issued_at=issued, expires_at=issued + ttl_s, tier=tier, recipe=(recipe or Recipe()).to_dict(),
            base_version=base_version,
        )


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(data: bytes) -> bytes:
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))


class TicketSigner:
    """Signs and verifies tickets with one shared secret (at least 16 bytes)."""

    def __init__(self, secret: bytes | str, clock: Callable[[], float] = time.time) -> None:
        key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
        if len(key) < MIN_SECRET_BYTES:
            raise ValueError(f"the ticket secret has {len(key)} bytes; use at least {MIN_SECRET_BYTES} random bytes")
        self._key = key
        self._clock = clock

    def _mac(self, signed: bytes) -> bytes:
        return hmac.new(self._key, signed, hashlib.sha256).digest()

    def sign(self, ticket: Ticket) -> bytes:
        payload = json.dumps(asdict(ticket), sort_keys=True, separators=(",", ":")).encode("utf-8")
        signed = PREFIX + _b64(payload)
        return signed + b"." + _b64(self._mac(signed))

    def verify(self, token: bytes, *, now: float | None = None, check_expiry: bool = True) -> Ticket:
        """The ticket, or TicketError: malformed, bad signature (tampered / other secret), or expired."""
        if not token:
            raise TicketMalformedError("no ticket given; present the ticket from your assignment")
        if len(token) > MAX_TICKET_BYTES:
            raise TicketMalformedError(f"ticket is {len(token)} bytes; tickets are at most {MAX_TICKET_BYTES}")
        if not token.startswith(PREFIX) or token.count(b".") != 2:
            raise TicketMalformedError("not a RaFFM ticket (expected 'rft1.<payload>.<mac>')")
        signed, _, mac_part = token.rpartition(b".")
        try:
            mac = _unb64(mac_part)
        except (binascii.Error, ValueError):
            raise TicketMalformedError("ticket signature is not base64url") from None
        if not hmac.compare_digest(mac, self._mac(signed)):
            raise TicketSignatureError("ticket signature does not match: it was altered or signed by another server")
        try:
            fields = json.loads(_unb64(signed[len(PREFIX):]))
            ticket = Ticket(**fields)
            spec = ElasticSpec.from_dict(ticket.spec)
            ticket.training_recipe  # noqa: B018 - validates the recipe
        except (binascii.Error, ValueError, TypeError) as exc:
            raise TicketMalformedError(f"ticket payload is unreadable: {exc}") from None
        if spec.key() != ticket.spec_key:
            raise TicketMalformedError(f"ticket spec does not match its spec key {ticket.spec_key!r}")
        current = self._clock() if now is None else now
        if check_expiry and current >= ticket.expires_at:
            raise TicketExpiredError(
                f"ticket {ticket.ticket_id} for round {ticket.round_id} expired {current - ticket.expires_at:.0f} s ago;"
                " poll for a new assignment"
            )
        return ticket
