"""A job's settings are checked when the job is built: a bad one names itself and what to give instead, before any
round runs (an assignment carries them in unsigned protobuf fields, which cannot hold a negative number)."""

from __future__ import annotations

import pytest

from services.aggregator.config import JobConfig


@pytest.mark.parametrize(("setting", "value", "message"), [
    ("optimizer", "lion", "choose one of adamw, sgd"),
    ("local_steps", -1, "must be >= 0"),
    ("warmup_steps", -2, "must be >= 0"),
    ("seed", -1, "must be >= 0"),
    ("weight_decay", -0.1, "must be >= 0"),
    ("fedprox_mu", float("nan"), "must be >= 0"),
    ("seq_len", 0, "must be >= 1"),
    ("local_epochs", 0, "must be >= 1"),
    ("poll_wait_s", 0.0, "must be > 0 seconds"),
])
def test_a_bad_setting_is_refused_by_name(setting: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"job setting {setting} = .*: {message}"):
        JobConfig(**{setting: value})  # type: ignore[arg-type]


def test_both_optimizers_are_accepted() -> None:
    assert JobConfig(optimizer="sgd").optimizer == "sgd"
    assert JobConfig().optimizer == "adamw"
