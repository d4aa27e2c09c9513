"""How often `raffm demo`'s progress display scrapes the services' /metrics: each scrape parses both services' whole
exposition (and makes them render it), so it happens only when something is shown, and at most every SCRAPE_S for
the live bar."""

from __future__ import annotations

import io

import pytest

from raffm.v1 import aggregator_pb2
from raffm_app import follow
from raffm_app.follow import SCRAPE_S, RoundProgress


class Clock:
    now = 1_000.0

    def time(self) -> float:
        return self.now


@pytest.mark.parametrize("live", [True, False], ids=["bar", "lines"])
def test_scrapes_only_when_the_progress_is_shown(monkeypatch, live: bool) -> None:
    clock = Clock()
    monkeypatch.setattr(follow.time, "time", clock.time)
    progress = RoundProgress(8, 4, {}, every_s=15.0, live=live, out=io.StringIO())
    scrapes = []
    monkeypatch.setattr(progress, "moved", lambda: scrapes.append(clock.now) or 100 * len(scrapes))
    rnd = aggregator_pb2.Round(index=1, assigned=8, state=aggregator_pb2.ROUND_STATE_OPEN)
    for _ in range(60):  # the demo updates once a second
        progress.update(rnd)
        clock.now += 1.0
    progress.close()
    if live:  # the round's starting point, then at most one scrape per SCRAPE_S
        gaps = [b - a for a, b in zip(scrapes, scrapes[1:])]
        assert scrapes[0] == 1_000.0 and gaps and min(gaps) >= SCRAPE_S
    else:  # the round's starting point, then one scrape per line printed (every 15 s)
        lines = progress.out.getvalue().splitlines()
        assert len(lines) == 4 and len(scrapes) == 1 + len(lines)
        assert lines[-1].startswith("round 1: 0/8 devices done, 0.0 MiB moved, 0 s")
