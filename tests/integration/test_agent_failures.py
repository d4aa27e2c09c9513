"""What the agent refuses and survives, against the real services: an over-budget assignment is refused and
reported; a training error is reported and the agent keeps polling; SIGTERM mid-training exits cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edge_agent.state import STATE_FILE
from raffm.data import TextDataset
from raffm.v1 import aggregator_pb2, common_pb2, registry_pb2
from services.registry.testing import ENROLL_KEY
from tests.integration.agentkit import (
    WAIT_S, AgentThread, Fleet, agent_config, job, list_devices, rounds, tiny_model, wait_for,
)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("model"))


def _round(fleet: Fleet, index: int = 1) -> aggregator_pb2.Round:
    rnd = next(r for r in rounds(fleet) if r.index == index)
    return fleet.agg_stub().GetRound(aggregator_pb2.GetRoundRequest(round_id=rnd.round_id), metadata=fleet.operator,
                                     timeout=10)


def test_over_budget_assignment_is_refused_and_reported(tmp_path: Path, model: Path) -> None:
    # Until the profile edit reaches the aggregator (no device cache here), nothing fits this device: every round it
    # polls fails at once, so the job has rounds to spare.
    fleet = Fleet(tmp_path, job(model, rounds=100), device_cache_s=0.0).start()
    try:
        # The device declares 8 MiB: nothing fits, so the aggregator makes it wait ...
        runner = AgentThread(agent_config(fleet, "tiny-phone", tmp_path / "state", model, memory_mb=8)).start()
        device = wait_for(lambda: list_devices(fleet), "registration")[0]
        # ... until an operator edits the registry's record to a far larger budget (a stale or wrong profile).
        big = common_pb2.DeviceProfile(train_memory_mb=100_000, gflops=100, up_mbps=100, down_mbps=100, tier="laptop")
        fleet.registry.stub.UpdateProfile(
            registry_pb2.UpdateProfileRequest(device_id=device.device_id, profile=big),
            metadata=fleet.registry.operator, timeout=10)
        assert runner.join() == 0
        [o] = runner.agent.outcomes
        assert o.status == "refused", o
        assert "exceeds this device's declared budget 8 MiB" in o.detail
        assert o.predicted_mb > 8 and o.peak_memory_mb == 0  # refused before downloading or training
        rnd = wait_for(lambda: next((r for r in rounds(fleet) if r.dropped == 1), None), "the refusal to be counted")
        assert rnd.accepted == 0
    finally:
        fleet.stop()


def test_training_error_is_reported_and_the_agent_keeps_polling(tmp_path: Path, model: Path) -> None:
    fleet = Fleet(tmp_path, job(model, rounds=2)).start()
    try:
        bad = TextDataset([None] * 8, [0, 1] * 4, ("rotten", "fresh"))  # type: ignore[list-item]
        runner = AgentThread(agent_config(fleet, "bad-data", tmp_path / "state", model, max_rounds=0),
                             data=bad).start()
        wait_for(lambda: runner.agent.outcomes, "the first outcome")
        o = runner.agent.outcomes[0]
        assert o.status == "failed" and "local data" in o.detail, o
        wait_for(lambda: _round(fleet).dropped == 1, "the failure to be counted")
        # Its only device gave up and no other is online: the round fails at once, with the device's reason.
        rnd = wait_for(lambda: (r := _round(fleet)).state == aggregator_pb2.ROUND_STATE_FAILED and r, "round 1 failed")
        assert [(f.reason, f.devices) for f in rnd.failures] == [("data", 1)] and "local data" in rnd.failures[0].detail
        # still alive and polling
        polls = runner.agent.client.retries
        assert runner.thread.is_alive() and polls == runner.agent.client.retries
        assert runner.stop() == 0
    finally:
        fleet.stop()


def test_sigterm_during_training_exits_cleanly(tmp_path: Path, model: Path) -> None:
    fleet = Fleet(tmp_path, job(model, local_steps=0, local_epochs=100_000, batch_size=2)).start()
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": f"review number {i}", "label": i % 2}) + "\n" for i in range(64)))
    state = tmp_path / "state"
    cmd = [sys.executable, "-m", "raffm_app", "agent", "run", "--registry", fleet.registry.address,
           "--aggregator", fleet.aggregator.address, "--extractor", fleet.extractor.address, "--name", "sigterm",
           "--state-dir", str(state), "--data", str(data), "--model", str(model), "--memory-mb", "2000",
           "--gflops", "50", "--up-mbps", "50", "--down-mbps", "50", "--threads", "1", "--log-format", "json"]
    env = dict(os.environ, RAFFM_AGENT_ENROLL_KEY=ENROLL_KEY, TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    events: list[dict] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("{"):
                events.append(json.loads(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        def training() -> bool:
            assert proc.poll() is None, f"agent exited early ({proc.returncode}): {events}"
            return any(e.get("event") == "assignment" for e in events) and bool(list(state.glob("work/received-*")))

        wait_for(training, "training to start", timeout=WAIT_S)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT_S) == 0
        reader.join(10)
        names = [e.get("event") for e in events]
        assert "reported_failure" in names and names[-1] == "stopped", names
        saved = json.loads((state / STATE_FILE).read_text())  # intact, parseable
        assert saved["device_id"] and saved["history"] == [f"{_round(fleet).round_id}:stopped"]
        assert not list(state.glob(".agent-state-*")) and not list((state / "work").glob("*"))
        assert _round(fleet).dropped == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        fleet.stop()


def test_named_labels_are_numbered_by_the_jobs_list_and_a_foreign_label_is_refused(tmp_path: Path,
                                                                                   model: Path) -> None:
    """A device whose file holds only the job's second label trains it as label 1 (numbered by its own names it
    would be 0, the other class); a device with a label the job does not have reports a data failure naming it."""
    fresh = tmp_path / "fresh.csv"
    fresh.write_text("review,label\n" + "".join(f"great film {i},fresh\n" for i in range(8)))
    fleet = Fleet(tmp_path / "one", job(model, labels=("rotten", "fresh"))).start()
    try:
        runner = AgentThread(agent_config(fleet, "fresh-only", tmp_path / "state", model, data=str(fresh)),
                             load_data=True).start()
        assert runner.join() == 0
        assert [o.status for o in runner.agent.outcomes] == ["uploaded"]
        assert runner.agent._dataset.labels == [1] * 8 and runner.agent._dataset.label_names == ("rotten", "fresh")
    finally:
        fleet.stop()
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"text": f"film {i}", "label": ("fresh", "meh")[i % 2]}) + "\n"
                             for i in range(8)))
    fleet = Fleet(tmp_path / "two", job(model, labels=("rotten", "fresh"))).start()
    try:
        runner = AgentThread(agent_config(fleet, "foreign", tmp_path / "state2", model, data=str(mixed)),
                             load_data=True).start()
        assert runner.join() == 0
        [o] = runner.agent.outcomes
        assert o.status == "failed" and "labels ['meh'] are not among the job's 2 labels" in o.detail, o
        rnd = wait_for(lambda: (r := _round(fleet)).state == aggregator_pb2.ROUND_STATE_FAILED and r, "round 1 failed")
        assert [f.reason for f in rnd.failures] == ["data"] and "'meh'" in rnd.failures[0].detail
    finally:
        fleet.stop()


def test_a_folder_of_images_trains_a_vit_of_another_input_size_and_is_evaluated(tmp_path: Path) -> None:
    """The device's photos (grey, 24 x 24, one subfolder per label) are fitted to the job's ViT (colour, 16 x 16)
    on the device and in the aggregator's evaluation."""
    from PIL import Image

    from raffm.models import model_from_config, small_vit_config

    vit = tmp_path / "vit"
    model_from_config(small_vit_config(num_labels=2, image_size=16, num_channels=3),
                      task="image-classification").save_pretrained(vit)
    photos = tmp_path / "photos"
    for label, shade in (("dark", 30), ("light", 220)):
        (photos / label).mkdir(parents=True)
        for i in range(6):
            Image.new("L", (24, 24), shade + i).save(photos / label / f"{i}.png")
    fleet = Fleet(tmp_path / "fleet", job(vit, task="image-classification", labels=("light", "dark"),
                                          eval_data=str(photos))).start()
    try:
        runner = AgentThread(agent_config(fleet, "camera", tmp_path / "state", vit, data=str(photos)),
                             load_data=True).start()
        assert runner.join() == 0
        assert [o.status for o in runner.agent.outcomes] == ["uploaded"], runner.agent.outcomes
        assert runner.agent._dataset.labels == [1] * 6 + [0] * 6  # numbered by the job's list: dark is 1
        rnd = wait_for(lambda: (r := _round(fleet)).evaluation and r, "round 1's evaluation")
        assert rnd.accepted == 1 and 0 <= rnd.evaluation["accuracy"] <= 1
    finally:
        fleet.stop()
