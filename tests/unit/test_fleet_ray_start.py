"""Starting a local Ray node on a busy machine: Ray gives its raylet a fixed 30 s to register and then raises a bare
Exception; the fleet simulator starts the node again instead of failing the whole run. Pure retry logic, so a fake
``ray`` module stands in for the real one (the real one runs in tests/integration/test_fleet_scale.py)."""

from __future__ import annotations

from typing import Any

import pytest

from edge_agent.fleet import _start_ray

TIMEOUT = Exception("The current node timed out during startup. This could happen because some of the raylet "
                    "failed to startup or the GCS has become overloaded.")


class FakeRay:
    def __init__(self, failures: list[Exception]) -> None:
        self.failures = list(failures)
        self.inits = self.shutdowns = 0

    def init(self, **_: Any) -> None:
        self.inits += 1
        if self.failures:
            raise self.failures.pop(0)

    def shutdown(self) -> None:
        self.shutdowns += 1


def test_a_node_that_timed_out_is_started_again() -> None:
    ray = FakeRay([TIMEOUT])
    _start_ray(ray, "")
    assert (ray.inits, ray.shutdowns) == (2, 1)


def test_other_errors_and_the_last_timeout_are_raised() -> None:
    ray = FakeRay([ValueError("bad address")])
    with pytest.raises(ValueError, match="bad address"):
        _start_ray(ray, "ray://nowhere:1")
    assert ray.inits == 1
    ray = FakeRay([TIMEOUT, TIMEOUT, TIMEOUT])
    with pytest.raises(Exception, match="timed out during startup"):
        _start_ray(ray, "", attempts=3)
    assert (ray.inits, ray.shutdowns) == (3, 2)
