"""Signed tickets: they bind device, round, version and spec; any change, other secret or expiry is refused."""

from __future__ import annotations

import base64
import json

import pytest

from raffm.spec import ElasticSpec, ModelDims
from raffm.tickets import (
    Ticket,
    TicketExpiredError,
    TicketMalformedError,
    TicketSignatureError,
    TicketSigner,
)

DIMS = ModelDims(hidden=32, layers=2, heads=4, head_dim=8, ffn=64)
SECRET = b"s" * 32


def _ticket(now: float = 1000.0) -> Ticket:
    return Ticket.create(device_id="dev-1", job_id="job", round_id="job-r1", model_version="job-v0",
                         spec=ElasticSpec.uniform(DIMS, heads=2, ffn=32), wire_dtype="float16", ttl_s=60, now=now)


def test_sign_verify_round_trip() -> None:
    signer = TicketSigner(SECRET, clock=lambda: 1010.0)
    ticket = _ticket()
    back = signer.verify(signer.sign(ticket))
    assert back == ticket
    assert back.elastic_spec == ElasticSpec.uniform(DIMS, heads=2, ffn=32)
    assert back.base_version == ""  # plain fine-tuning
    lora = Ticket.create(device_id="dev-1", job_id="job", round_id="job-r2", model_version="job-v1",
                         spec=ElasticSpec.uniform(DIMS, heads=2, ffn=32), wire_dtype="float32", ttl_s=60, now=1000.0,
                         base_version="job-v0")
    assert signer.verify(signer.sign(lora)).base_version == "job-v0"


@pytest.mark.parametrize("field,value", [
    ("device_id", "dev-2"), ("round_id", "job-r2"), ("model_version", "job-v9"), ("expires_at", 10 ** 10),
    ("base_version", "job-v3"),
])
def test_any_changed_field_breaks_the_signature(field: str, value: object) -> None:
    signer = TicketSigner(SECRET, clock=lambda: 1010.0)
    token = signer.sign(_ticket())
    prefix, payload, mac = token.split(b".")
    fields = json.loads(base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4)))
    fields[field] = value
    forged = base64.urlsafe_b64encode(json.dumps(fields).encode()).rstrip(b"=")
    with pytest.raises(TicketSignatureError, match="altered"):
        signer.verify(b".".join([prefix, forged, mac]))


def test_spec_swapped_with_a_bigger_one_is_refused_even_when_signed() -> None:
    signer = TicketSigner(SECRET, clock=lambda: 1010.0)
    t = _ticket()
    bad = Ticket(**{**t.__dict__, "spec": ElasticSpec.full(DIMS).to_dict()})
    with pytest.raises(TicketMalformedError, match="spec key"):
        signer.verify(signer.sign(bad))


def test_other_secret_expired_and_garbage() -> None:
    token = TicketSigner(SECRET).sign(_ticket())
    with pytest.raises(TicketSignatureError):
        TicketSigner(b"x" * 32, clock=lambda: 1010.0).verify(token)
    with pytest.raises(TicketExpiredError, match="expired"):
        TicketSigner(SECRET, clock=lambda: 1061.0).verify(token)
    assert TicketSigner(SECRET, clock=lambda: 5000.0).verify(token, check_expiry=False).device_id == "dev-1"
    for junk in (b"", b"hello", b"rft1.abc", b"rft1.a.b", token[:-3] + b"!!!"):
        with pytest.raises((TicketMalformedError, TicketSignatureError)):
            TicketSigner(SECRET).verify(junk)
    with pytest.raises(ValueError, match="at least 16"):
        TicketSigner(b"short")
