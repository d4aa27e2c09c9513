"""Federated LoRA rounds through the real registry, extractor and aggregator on a tiny random-init Llama: the job's
strategy option ``lora_ranks`` gives each device the largest rank its budget allows; after its first round a device
downloads adapters only (its base slice, version 0's, stays in its tensor cache), uploads adapters only, and the
aggregator folds the products into the merged global model, also across a restart mid-round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from edge_agent.transfer import download_once, upload_once
from raffm.lora_fed import lora_update
from raffm.planning import cost_model_for
from raffm.proto import recipe_from_proto
from raffm.reassembly import MemorySink
from raffm.v1 import aggregator_pb2
from tests.integration.agentkit import AgentThread, agent_config, rounds
from tests.integration.fedloop import Fleet, download, expected_fit, payload, plan_of, spec_of, tiny_job
from tests.integration.llmkit import tiny_llama_folder, toy_pairs, write_jsonl

RANKS = (2, 32)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("model") / "tiny-llama")


def lora_job(model: Path, **overrides: Any) -> Any:
    values: dict[str, Any] = dict(
        task="causal-lm", num_labels=2, rounds=2, clients_per_round=2, quorum=2, min_updates=2, batch_size=4,
        seq_len=16, local_steps=2, lr=1e-2, calibrate=False, round_deadline_s=300.0,
        strategy_options={"lora_ranks": list(RANKS), "checkpointing": False})
    values.update(overrides)
    return tiny_job(model, **values)


def rank_budgets(job: Any, config: dict[str, Any]) -> dict[int, int]:
    """Rank -> the smallest whole-MiB training budget for which the job's strategy plans that rank."""
    found: dict[int, int] = {}
    for mb in range(1, 512):
        try:
            fit = expected_fit(job, config, mb)
        except ValueError:
            continue
        found.setdefault(fit.recipe.lora_rank, mb)
        if max(RANKS) in found:
            break
    assert set(found) >= set(RANKS), found
    return found


def test_two_devices_of_different_ranks_finish_two_lora_rounds(tmp_path: Path, model: Path) -> None:
    train = write_jsonl(toy_pairs(24, seed=1), tmp_path / "train.jsonl")
    fleet = Fleet(tmp_path, lora_job(model)).start()
    try:
        config = fleet.store.info("job-v0").config
        budgets = rank_budgets(fleet.job, config)
        runners = [AgentThread(agent_config(fleet, name, tmp_path / name, model, memory_mb=budgets[rank], tier=tier,
                                            data=str(train), max_rounds=2), load_data=True).start()
                   for name, tier, rank in (("small", "sbc", RANKS[0]), ("large", "laptop", RANKS[1]))]
        for runner in runners:
            assert runner.join() == 0
            assert [o.status for o in runner.agent.outcomes] == ["uploaded", "uploaded"], runner.agent.outcomes
        ranks = [[recipe_from_proto(a.recipe).lora_rank for a in r.assignments] for r in runners]
        assert ranks == [[RANKS[0]] * 2, [RANKS[1]] * 2]
        stub = fleet.agg_stub()
        r1, r2 = sorted((fleet.wait_round(stub, r.round_id) for r in rounds(fleet)), key=lambda r: r.index)
        assert r1.state == r2.state == aggregator_pb2.ROUND_STATE_CLOSED and r1.accepted == r2.accepted == 2
        v0, v2 = fleet.store.load("job-v0"), fleet.store.load(r2.result_model_version)
        changed = {n for n in v0 if not torch.equal(v0[n], v2[n])}
        assert changed and all(n.endswith("_proj.weight") for n in changed), sorted(changed)  # only LoRA targets
        # Round 1 downloads the base slices too; round 2 moves adapters only, both ways.
        full = r2.full_model_bytes  # what full-model FedAvg would have moved: the model down and up, per device
        assert r2.bytes_down + r2.bytes_up < 0.25 * full, (r2.bytes_down, r2.bytes_up, full)
        assert r2.bytes_down < r1.bytes_down / 3 and r2.bytes_up == r1.bytes_up
        print(f"\nLoRA ranks {RANKS}: round 1 down {r1.bytes_down} up {r1.bytes_up}; round 2 down {r2.bytes_down} "
              f"up {r2.bytes_up}; full-model FedAvg {full} per round")
    finally:
        fleet.stop()


def test_lora_uploads_fold_as_dense_products_also_after_a_restart_mid_round(tmp_path: Path, model: Path) -> None:
    """Scripted devices: version r = version r-1 + the sample-weighted mean of s (B'A' - BA) over the devices' slices,
    where BA is what the extractor sent (round 2: the rank-r SVD of the device's block of v1 - v0, on v0's base
    slice); the aggregator restarts between round 2's two uploads and still folds the second correctly."""
    # Without server momentum, so that each version is exactly the previous one plus its round's mean (momentum has
    # its own test in test_round.py).
    job = lora_job(model, strategy_options={"lora_ranks": list(RANKS), "checkpointing": False, "server_momentum": 0.0})
    fleet = Fleet(tmp_path, job).start()
    try:
        config = fleet.store.info("job-v0").config
        budgets = rank_budgets(fleet.job, config)
        devices = [fleet.register(f"d{rank}", train_memory_mb=budgets[rank], tier="laptop") for rank in RANKS]
        shapes = {n: tuple(t.shape) for n, t in fleet.store.load("job-v0").items()}
        cm_targets = fleet.job.method().lora_targets_for(cost_model_for(config))
        received_bases: list[dict[str, torch.Tensor]] = []
        for r in (1, 2):
            stub = fleet.agg_stub()
            previous = fleet.store.load(f"job-v{r - 1}")
            sums = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in previous.items()}
            cover = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in previous.items()}
            for i, dev in enumerate(devices):
                if r == 2 and i == 1:  # restart with one update committed
                    fleet.stop_aggregator()
                    fleet.metrics = type(fleet.metrics)()
                    fleet.start_aggregator()
                    stub = fleet.agg_stub()
                a = fleet.poll(stub, dev).assignment
                recipe = recipe_from_proto(a.recipe)
                assert recipe.lora_rank == RANKS[i] and recipe.lora_targets == cm_targets
                got = download(fleet, dev, a)
                adapters = {n: t for n, t in got.items() if n.endswith((".lora_A", ".lora_B"))}
                base = {n: t for n, t in got.items() if n not in adapters}
                plan = plan_of(config, shapes, spec_of(a))
                if r == 1:  # the frozen base at the strategy's lora_base_dtype, the adapters at the job's wire dtype
                    v0 = fleet.store.load("job-v0")
                    assert all(torch.equal(t, plan[n].take(v0[n]).to(torch.float16)) for n, t in base.items())
                    assert all(t.dtype == torch.float32 for t in adapters.values())
                    received_bases.append(base)
                else:  # the same base bytes again (the agent's cache skips them), adapters carrying v1 - v0
                    assert all(torch.equal(base[n], received_bases[i][n]) for n in base)
                    other = download_from(fleet, fleet.add_extractor(), dev, a)  # another replica: the same bytes
                    assert other.keys() == got.keys() and all(torch.equal(other[n], got[n]) for n in got)
                    scaling = recipe.lora.scaling  # type: ignore[union-attr]
                    v0 = fleet.store.load("job-v0")
                    for name in [n for n in plan if n.endswith("q_proj.weight")]:
                        m = name[: -len(".weight")]
                        product = adapters[m + ".lora_B"].double() @ adapters[m + ".lora_A"].double() * scaling
                        block = plan[name].take(previous[name]).double() - plan[name].take(v0[name]).double()
                        rel = (product - block).norm() / block.norm()
                        assert rel < (1e-4 if RANKS[i] >= min(block.shape) else 1.0), (name, float(rel))
                if r == 1 and i == 0:  # a full-parameter delta, or adapters of another rank, are refused
                    for bad in ({n: torch.zeros(t.shape) for n, t in base.items()},
                                {n: torch.zeros(t.shape[0], 3) if n.endswith("lora_B") else torch.zeros(3, t.shape[1])
                                 for n, t in adapters.items()}):
                        with pytest.raises(grpc.RpcError) as err:
                            upload_once(stub, a.ticket, 4, payload(bad, fleet.job.wire_dtype), metadata=dev.md)
                        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
                g = torch.Generator().manual_seed(10 * r + i)
                delta = {n: torch.randn(t.shape, generator=g) * 1e-2 for n, t in adapters.items()}
                samples = 4 + 4 * i
                reply = upload_once(stub, a.ticket, samples, payload(delta, fleet.job.wire_dtype), metadata=dev.md)
                assert reply.accepted, reply
                dense = lora_update(adapters, {n: adapters[n] + delta[n] for n in adapters}, plan,
                                    recipe.lora.scaling)  # type: ignore[union-attr]
                for name, d in dense.items():  # coverage-weighted: per element, over the devices that hold it
                    block = plan[name].block(sums[name])
                    block += samples * d.double().reshape(block.shape)
                    plan[name].block(cover[name])[...] += samples
            rnd = fleet.wait_round(stub, f"job-r{r}")
            assert rnd.state == aggregator_pb2.ROUND_STATE_CLOSED and rnd.accepted == 2, rnd
            if r == 2:  # adapters only up (these scripted devices download everything: no tensor cache)
                assert rnd.bytes_up < 0.1 * rnd.full_model_bytes
            new = fleet.store.load(f"job-v{r}")
            for name, t in previous.items():
                step = torch.where(cover[name] > 0, sums[name] / cover[name].clamp(min=1), 0.0)
                want = (t.double() + step).to(t.dtype)
                torch.testing.assert_close(new[name], want, rtol=1e-5, atol=1e-6, msg=name)
    finally:
        fleet.stop()


def download_from(fleet: Fleet, app: Any, dev: Any, assignment: Any) -> dict[str, torch.Tensor]:
    """A download from one extractor replica ``app``."""
    sink = MemorySink()
    download_once(fleet.ext_stub(app), assignment.ticket, sink, metadata=dev.md).reassembler.finish()
    return sink.tensors
