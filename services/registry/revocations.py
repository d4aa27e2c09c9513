"""The registry's revocation feed (WatchRevocations): every device whose tokens this registry revokes, sent at once to
each service that watches, so those services may reuse VerifyToken answers for long without serving a revoked device.

Runs on the registry's event loop. A watcher whose backlog fills up (it stopped reading) is dropped: its stream ends,
and the watcher, which then relies on the feed no longer, forgets what it cached and reconnects.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

BACKLOG = 10_000  # revocations a watcher may fall behind by before its stream is ended


class RevocationFeed:
    def __init__(self, backlog: int = BACKLOG) -> None:
        self._backlog = backlog
        self._watchers: set[asyncio.Queue[str | None]] = set()  # None: the stream must end

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    def publish(self, device_id: str) -> None:
        """A device's tokens were revoked (call on the event loop, after the revocation is committed)."""
        for queue in list(self._watchers):
            if queue.qsize() >= self._backlog:  # room for the end marker is kept
                self._end(queue)
            else:
                queue.put_nowait(device_id)

    def close(self) -> None:
        """End every watcher's stream (the registry is stopping)."""
        for queue in list(self._watchers):
            self._end(queue)

    def _end(self, queue: asyncio.Queue[str | None]) -> None:
        self._watchers.discard(queue)
        queue.put_nowait(None)

    async def watch(self) -> AsyncIterator[str | None]:
        """Yields None once the watcher is registered (the feed is live for it), then each revoked device id; ends
        when the watcher is dropped or the feed closes."""
        queue: asyncio.Queue[str | None] = asyncio.Queue(self._backlog + 1)
        self._watchers.add(queue)
        try:
            yield None
            while (device_id := await queue.get()) is not None:
                yield device_id
        finally:
            self._watchers.discard(queue)
