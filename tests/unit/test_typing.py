"""The house style says mypy-clean: keep it so."""

from __future__ import annotations

import pytest

from tests.unit.conftest import MYPY_RUN, start_mypy


@pytest.mark.timeout(600)
def test_mypy_is_clean(request: pytest.FixtureRequest) -> None:
    pytest.importorskip("mypy")
    # Usually started in the background when the session's tests were collected (see the conftest).
    proc = request.config.stash.get(MYPY_RUN, None) or start_mypy()
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-4000:] + stderr[-2000:]
