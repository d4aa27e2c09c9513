from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import PreTrainedModel

from raffm.models import load_global_model


@pytest.fixture(scope="session")
def minilm() -> PreTrainedModel:
    """The real all-MiniLM-L6-v2 (shipped in a package), with a 2-label head."""
    return load_global_model()


# --- mypy in the background (suite time) -----------------------------------------------------------------------------
# mypy takes a minute and more of one core, and most of the suite waits on processes and sockets: when
# test_mypy_is_clean is among the collected tests, mypy starts as soon as collection ends and the test collects
# its verdict.

ROOT = Path(__file__).resolve().parents[2]
MYPY_RUN = pytest.StashKey[subprocess.Popen[str]]()


def start_mypy() -> subprocess.Popen[str]:
    packages = ["raffm", "raffm_app", "services", "edge_agent", "bench"]
    return subprocess.Popen([sys.executable, "-m", "mypy", *packages], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def pytest_collection_finish(session: pytest.Session) -> None:
    if importlib.util.find_spec("mypy") and any(item.name == "test_mypy_is_clean" for item in session.items):
        session.config.stash[MYPY_RUN] = start_mypy()


def pytest_sessionfinish(session: pytest.Session) -> None:
    proc = session.config.stash.get(MYPY_RUN, None)
    if proc is not None and proc.poll() is None:  # the run stopped before the test read it
        proc.kill()
        proc.communicate()
