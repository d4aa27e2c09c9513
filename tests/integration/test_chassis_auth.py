"""Token verifiers and header parsing (the pieces other services compose)."""

from __future__ import annotations

import asyncio

from services.common.auth import (
    CachingTokenVerifier, ChainedTokenVerifier, Principal, StaticTokenVerifier, bearer_token, hash_token, new_token,
)


class CountingVerifier:
    def __init__(self) -> None:
        self.calls = 0

    async def verify(self, token: str) -> Principal | None:
        self.calls += 1
        return Principal(subject=f"dev-{token}") if token.startswith("good") else None


def test_bearer_token_parsing():
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("x-other", "1"), ("authorization", "bearer  abc ")]) == "abc"
    for md in ([], [("authorization", "abc")], [("authorization", "Basic abc")], [("authorization", "Bearer ")]):
        assert bearer_token(md) is None


def test_tokens_are_random_and_hashed():
    a, b = new_token(), new_token()
    assert a != b and a.startswith("rfm_") and len(a) > 40
    assert hash_token(a) != a and len(hash_token(a)) == 64


def test_static_and_chained_verifiers():
    chain = ChainedTokenVerifier([StaticTokenVerifier({"ops": "op-token", "unused": ""}), CountingVerifier()])
    assert asyncio.run(chain.verify("op-token")) == Principal(subject="ops", is_operator=True)
    assert asyncio.run(chain.verify("good1")) == Principal(subject="dev-good1")
    assert asyncio.run(chain.verify("")) is None and asyncio.run(chain.verify("bad")) is None


def test_cache_hits_expire_and_can_be_evicted():
    now = [0.0]
    inner = CountingVerifier()
    cache = CachingTokenVerifier(inner, ttl_s=10, max_entries=2, clock=lambda: now[0])

    async def scenario():
        for _ in range(3):
            assert (await cache.verify("good1")).subject == "dev-good1"
        assert inner.calls == 1
        assert await cache.verify("bad") is None and await cache.verify("bad") is None
        assert inner.calls == 3  # unknown tokens are never cached
        now[0] = 11
        await cache.verify("good1")
        assert inner.calls == 4  # expired
        cache.invalidate_subject("dev-good1")
        await cache.verify("good1")
        assert inner.calls == 5  # evicted on revocation
        await cache.verify("good2")
        await cache.verify("good3")  # bounded: good1 (least recent) dropped
        await cache.verify("good1")
        assert inner.calls == 8

    asyncio.run(scenario())


def test_an_answer_fetched_across_a_revocation_is_not_kept():
    """The registry may have read the token before the revocation that invalidated the cache mid-call: returning it
    once is unavoidable, keeping it for the TTL would serve a revoked device."""
    release = asyncio.Event()

    class SlowVerifier(CountingVerifier):
        async def verify(self, token: str) -> Principal | None:
            await release.wait()
            return await super().verify(token)

    inner = SlowVerifier()
    cache = CachingTokenVerifier(inner, ttl_s=60)

    async def scenario():
        call = asyncio.ensure_future(cache.verify("good1"))
        await asyncio.sleep(0)
        cache.invalidate_subject("dev-good1")
        release.set()
        assert (await call).subject == "dev-good1"
        await cache.verify("good1")
        assert inner.calls == 2  # asked again: the first answer was not kept
        await cache.verify("good1")
        assert inner.calls == 2  # an answer fetched without an invalidation is kept

    asyncio.run(scenario())
