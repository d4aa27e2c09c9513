"""The Strategy object: what each preset plans, trains, uploads, merges and publishes."""

from __future__ import annotations

import pytest
import torch

from raffm.costs import CostModel
from raffm.elastic import extract
from raffm.fitting import RoundBudget, memory_budget_mb, usable_memory_mb, width_spec
from raffm.spec import ElasticSpec
from raffm.strategy import STRATEGIES, Strategy, strategy_named
from tests.unit.models_fixtures import inputs, make, output

VOCAB = "bert.embeddings.word_embeddings.weight"
NESTED = (0.25, 0.5, 0.75)  # the sandwich recipe's cuts


def budget(memory: float) -> RoundBudget:
    return RoundBudget(train_memory_mb=memory, gflops=1e4, up_mbps=1e4, down_mbps=1e4, deadline_s=1e4, batch_size=8,
                       seq_len=12)


def test_raffm_freezes_the_vocabulary_and_the_nested_recipe_nests_its_cuts_inside_the_spec() -> None:
    cm = CostModel.from_model(make("bert"))
    assert STRATEGIES["raffm"].cuts(cm) == () and not STRATEGIES["raffm"].recipe_for(width_spec(cm.dims, 3), cm).nested
    raffm = STRATEGIES["raffm"].with_options(nested_fractions=NESTED)
    assert raffm.cuts(cm) == (width_spec(cm.dims, 1), width_spec(cm.dims, 2), width_spec(cm.dims, 3))
    recipe = raffm.recipe_for(width_spec(cm.dims, 3), cm)
    assert recipe.frozen == {n for n in cm.shapes if ".embeddings." in n or ".layer.0." in n} and VOCAB in recipe.frozen
    assert recipe.frozen_dtype == "float16"
    assert recipe.nested == (width_spec(cm.dims, 1), width_spec(cm.dims, 2))  # smallest first, never the spec itself
    assert raffm.recipe_for(width_spec(cm.dims, 1), cm).nested == ()
    plain = STRATEGIES["fedavg"].recipe_for(ElasticSpec.full(cm.dims), cm)
    assert not plain.frozen and not plain.nested and plain.frozen_dtype == "float32"
    assert recipe.prior_correction == 1.0 and plain.prior_correction == 0.0
    plain_loss = raffm.with_options(prior_correction=0.0)
    assert all(r.prior_correction == 0.0 for r in plain_loss.recipes_for(width_spec(cm.dims, 3), cm))
    with pytest.raises(ValueError, match="prior_correction is -0.5"):
        raffm.with_options(prior_correction=-0.5)


def test_frozen_layers_freeze_the_input_embeddings_and_the_first_layers_and_cost_less() -> None:
    cm = CostModel.from_model(make("bert"))  # 3 layers
    full = ElasticSpec.full(cm.dims)
    plain = STRATEGIES["raffm"].with_options(frozen_layers=0).recipe_for(full, cm)
    recipe = STRATEGIES["raffm"].recipe_for(full, cm)  # frozen_layers=1
    assert recipe.frozen == {n for n in cm.shapes if ".embeddings." in n or ".layer.0." in n}
    assert recipe.frozen_dtype == plain.frozen_dtype == "float16" and recipe.nested == plain.nested
    before, after = (cm.estimate(full, batch_size=8, seq_len=12, recipe=r) for r in (plain, recipe))
    assert after.upload_bytes < before.upload_bytes and after.cached_bytes > before.cached_bytes
    assert after.activations_mb < before.activations_mb and after.train_memory_mb < before.train_memory_mb
    assert after.forward_flops_per_sample == before.forward_flops_per_sample  # no backward below the frozen layers:
    assert after.flops_per_sample < before.flops_per_sample
    with pytest.raises(ValueError, match="frozen_layers is -1"):
        STRATEGIES["raffm"].with_options(frozen_layers=-1)
    deepest = STRATEGIES["raffm"].with_options(frozen_layers=9).recipe_for(full, cm)  # the last layer still trains
    assert {n for n in cm.shapes if ".layer." in n} - deepest.frozen == {n for n in cm.shapes if ".layer.2." in n}


def test_a_probe_round_trains_the_task_head_of_the_spec_the_device_fine_tunes_afterwards() -> None:
    cm = CostModel.from_model(make("bert"))
    raffm = STRATEGIES["raffm"].with_options(probe_rounds=1, probe_lr_scale=5.0)
    small = budget(memory_budget_mb(9.1))
    probe, first, unplanned = (raffm.plan(cm, small, round_index=r) for r in (1, 2, 0))
    assert probe.spec == first.spec == unplanned.spec and first.recipe == unplanned.recipe
    assert probe.spec != ElasticSpec.full(cm.dims)  # a slice: the device keeps its body for round 2
    plan = cm.plan(probe.spec)
    assert set(plan) - probe.recipe.frozen == {"classifier.weight", "classifier.bias"}
    assert probe.recipe.lr_scale == 5.0 and not probe.recipe.nested and first.recipe.lr_scale == 1.0
    assert probe.recipe.frozen_dtype == "float16"  # the vocabulary still travels and is stored at half precision
    # forward passes and a head: far less memory, compute and upload than fine-tuning the same spec
    assert probe.costs.train_memory_mb < first.costs.train_memory_mb
    assert probe.costs.activations_mb < first.costs.activations_mb / 4
    assert probe.costs.flops_per_sample < first.costs.flops_per_sample / 2
    assert probe.costs.upload_bytes == 4 * (plan["classifier.weight"].numel + plan["classifier.bias"].numel)
    assert raffm.upload_plan(plan, probe.recipe).keys() == {"classifier.weight", "classifier.bias"}
    with pytest.raises(ValueError, match="probe_rounds is -1"):
        raffm.with_options(probe_rounds=-1)
    with pytest.raises(ValueError, match="lr_scale is 0"):
        raffm.with_options(probe_lr_scale=0.0)


@pytest.mark.parametrize("kind", ["roberta", "vit", "bert-base", "opt-classifier", "gpt2-classifier",
                                  "neox-classifier", "modernbert", "modernbert-cls"])
def test_the_task_head_is_what_the_task_model_adds_to_its_body(kind: str) -> None:
    """A decoder's classifier (OPT's ``score``) is a fresh head too: probed like an encoder's."""
    cm = CostModel.from_model(make(kind))
    head = cm.adapter.task_head(cm.shapes)
    expected = {n for n in cm.shapes if n.startswith(("classifier.", "score."))}
    assert head == expected and (head or kind == "bert-base")  # RoBERTa's head has its own dense layer
    full = ElasticSpec.full(cm.dims)
    probe = STRATEGIES["raffm"].probe_recipe(full, cm)
    if head:
        assert probe is not None and set(cm.plan(full)) - probe.frozen == expected
    else:
        assert probe is None  # a bare body has no head to probe: its rounds fine-tune from the start


def test_fedavg_plans_the_whole_model_or_nothing_and_raffm_a_slice() -> None:
    cm = CostModel.from_model(make("bert"))
    full = ElasticSpec.full(cm.dims)
    assert STRATEGIES["fedavg"].plan(cm, budget(1e5)).spec == full
    tight = memory_budget_mb(9.1)  # enough for a slice, not for the whole model trained plainly
    with pytest.raises(ValueError, match="too small"):
        STRATEGIES["fedavg"].plan(cm, budget(tight))
    sliced = STRATEGIES["raffm"].plan(cm, budget(tight))
    assert sliced.spec != full and sliced.spec.hidden == full.hidden
    assert sliced.costs.train_memory_mb <= usable_memory_mb(tight)


def test_checkpointing_is_chosen_only_when_memory_needs_it() -> None:
    cm = CostModel.from_model(make("bert"))
    raffm = STRATEGIES["raffm"]
    roomy = raffm.plan(cm, budget(1e5))
    assert not roomy.recipe.checkpointing  # it costs compute: not without need
    plain = raffm.recipe_for(roomy.spec, cm)
    need = cm.estimate(roomy.spec, batch_size=8, seq_len=12, recipe=plain).train_memory_mb
    squeezed = raffm.plan(cm, budget(memory_budget_mb(need) - 0.1))  # the same spec no longer fits plainly
    assert squeezed.recipe.checkpointing or squeezed.spec != roomy.spec


def test_only_trained_tensors_are_uploaded() -> None:
    cm = CostModel.from_model(make("bert"))
    spec = width_spec(cm.dims, 2)
    recipe = STRATEGIES["raffm"].recipe_for(spec, cm)
    plan = cm.plan(spec)
    upload = Strategy.upload_plan(plan, recipe)
    assert set(plan) - set(upload) == recipe.frozen and VOCAB in recipe.frozen
    assert all(".layer.0." not in n and ".embeddings." not in n for n in upload)


@pytest.mark.parametrize("name, ordered", [("raffm", True), ("paper", True), ("heterofl", False)])
def test_version_0_is_salience_ordered_and_computes_the_same_function(name: str, ordered: bool) -> None:
    model = make("bert")
    cm = CostModel.from_model(model)
    state = strategy_named(name).initial(model.state_dict(), cm)
    moved = any(not torch.equal(state[n], t) for n, t in model.state_dict().items())
    assert moved == ordered
    copy = make("bert")
    copy.load_state_dict(state)
    batch = inputs("bert")
    assert (output(copy, batch) - output(model, batch)).abs().max().item() <= 1e-5


def test_raffm_keeps_its_channel_order_and_paper_reorders_every_version() -> None:
    model = make("bert")
    cm = CostModel.from_model(model)
    state = STRATEGIES["raffm"].initial(model.state_dict(), cm)
    gen = torch.Generator().manual_seed(0)
    merged = {n: t + 0.3 * torch.randn(t.shape, generator=gen) if t.is_floating_point() else t for n, t in state.items()}
    kept, _ = STRATEGIES["raffm"].next_version(merged, cm, previous=state)  # round 1: no momentum yet
    assert all(torch.equal(kept[n], merged[n]) for n in merged)
    reordered, _ = STRATEGIES["paper"].next_version(merged, cm)
    assert any(not torch.equal(reordered[n], merged[n]) for n in merged)


def test_server_momentum_accumulates_the_rounds_steps() -> None:
    model = make("bert")
    cm = CostModel.from_model(model)
    m = STRATEGIES["raffm"].with_options(server_momentum=0.5)
    w0 = {n: t.clone() for n, t in model.state_dict().items()}
    name = "classifier.weight"
    step1 = {n: t + 1.0 if n == name else t for n, t in w0.items()}
    w1, b1 = m.next_version(step1, cm, previous=w0)
    torch.testing.assert_close(w1[name], w0[name] + 1.0)  # round 1: plain FedAvg
    step2 = {n: t + 1.0 if n == name else t for n, t in w1.items()}
    w2, _ = m.next_version(step2, cm, previous=w1, momentum=b1)
    torch.testing.assert_close(w2[name], w1[name] + 1.5)  # round 2: this step plus half of the last
    # What did not move keeps its bits (-0.0 included: a frozen tensor whose bits change is downloaded again).
    word = "bert.embeddings.word_embeddings.weight"
    w0[word][0, :4] = -0.0
    same, _ = m.next_version(dict(w0), cm, previous=w0)
    assert all(torch.equal(same[n].view(torch.uint8), w0[n].view(torch.uint8)) for n in w0 if w0[n].is_floating_point())
    with pytest.raises(ValueError, match="stable channel order"):
        Strategy(ordering="every_round", server_momentum=0.9)


def test_a_probe_rounds_step_starts_no_server_momentum() -> None:
    model = make("bert")
    cm = CostModel.from_model(model)
    m = STRATEGIES["raffm"].with_options(server_momentum=0.5, probe_rounds=1)
    w0 = {n: t.clone() for n, t in model.state_dict().items()}
    name = "classifier.weight"
    probed = {n: t + 4.0 if n == name else t for n, t in w0.items()}
    w1, b1 = m.next_version(probed, cm, previous=w0, round_index=1)
    assert b1 is None and all(torch.equal(w1[n], probed[n]) for n in probed)
    step2 = {n: t + 1.0 if n == name else t for n, t in w1.items()}
    w2, b2 = m.next_version(step2, cm, previous=w1, momentum=b1, round_index=2)
    torch.testing.assert_close(w2[name], w1[name] + 1.0)  # the probe's step is not carried into fine-tuning
    assert b2 is not None


def test_an_update_weighs_the_samples_it_trained_and_bad_settings_are_named() -> None:
    assert STRATEGIES["raffm"].weight(48) == 48.0
    with pytest.raises(ValueError, match="trained on 0 samples"):
        STRATEGIES["raffm"].weight(0)
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'"):
        strategy_named("fedsgd")
    with pytest.raises(ValueError, match="nested_fractions"):
        Strategy(nested_fractions=(1.5,))
    with pytest.raises(ValueError, match="ordering"):
        Strategy(ordering="sometimes")  # type: ignore[arg-type]


def test_a_planned_slice_is_a_real_model() -> None:
    model = make("bert")
    cm = CostModel.from_model(model)
    plan = STRATEGIES["raffm"].plan(cm, budget(memory_budget_mb(9.1)))
    sub = extract(model, plan.spec)
    assert sum(p.numel() for p in sub.parameters()) == plan.costs.params


def test_lora_ranks_give_each_device_the_largest_rank_that_fits_and_upload_adapters() -> None:
    from raffm.lora import DEFAULT_TARGETS

    cm = CostModel.from_model(make("bert"))
    lora = STRATEGIES["raffm"].with_options(lora_ranks=(2, 8), checkpointing=False)
    full = ElasticSpec.full(cm.dims)
    ranks = [r.lora_rank for r in lora.recipes_for(full, cm)]
    assert ranks == [8, 2]
    assert all(r.lora_targets == DEFAULT_TARGETS["bert"] and not r.nested for r in lora.recipes_for(full, cm))
    need = {r.lora_rank: r for r in lora.recipes_for(full, cm)}
    mb = {rank: cm.estimate(full, batch_size=8, seq_len=12, recipe=recipe).train_memory_mb
          for rank, recipe in need.items()}
    assert mb[2] < mb[8]
    assert lora.plan(cm, budget(1e5)).recipe.lora_rank == 8
    probing = lora.with_options(probe_rounds=1)  # a LoRA job's first round trains its adapters, not a head
    assert probing.plan(cm, budget(1e5), round_index=1).recipe == lora.plan(cm, budget(1e5)).recipe
    between = lora.plan(cm, budget(memory_budget_mb((mb[2] + mb[8]) / 2)))
    assert between.spec == full and between.recipe.lora_rank == 2
    plan = cm.plan(full)
    upload = Strategy.upload_plan(plan, between.recipe)
    assert upload and all(n.endswith((".lora_A", ".lora_B")) for n in upload)
    a = next(n for n in upload if n.endswith("query.lora_A"))
    assert upload[a].sub_shape == (2, plan[a[: -len(".lora_A")] + ".weight"].sub_shape[1])
    with pytest.raises(ValueError, match="stable channel order"):
        STRATEGIES["paper"].with_options(lora_ranks=(4,))
    with pytest.raises(ValueError, match="rank must be an integer"):
        Strategy(lora_ranks=(0,))


def test_a_lora_rounds_frozen_base_travels_at_half_precision_and_its_adapters_at_the_wire_dtype() -> None:
    cm = CostModel.from_model(make("bert"))
    full = ElasticSpec.full(cm.dims)
    plan = cm.plan(full)
    vocab = cm.adapter.vocab_tensors(plan)
    wire = {}
    for base in ("float16", "float32"):
        lora = STRATEGIES["raffm"].with_options(lora_ranks=(4,), checkpointing=False, lora_base_dtype=base)
        (recipe,) = lora.recipes_for(full, cm)
        narrow = recipe.download_dtypes([*plan, "bert.encoder.layer.0.attention.self.query.lora_A"], vocab)
        assert "bert.encoder.layer.0.attention.self.query.lora_A" not in narrow  # adapters: the job's wire dtype
        if base == "float16":
            assert set(narrow) == set(plan) and set(narrow.values()) == {"float16"}
        else:
            assert set(narrow) == set(vocab)  # the frozen vocabulary only, at the precision the device stores it
        wire[base] = cm.estimate(full, batch_size=8, seq_len=12, recipe=recipe)
    params, adapters = wire["float16"].params, wire["float16"].trained_params
    assert wire["float16"].wire_bytes == 2 * params + 4 * adapters
    assert wire["float16"].wire_bytes < wire["float32"].wire_bytes
    assert wire["float16"].upload_bytes == wire["float32"].upload_bytes == 4 * adapters
    assert wire["float16"].train_memory_mb == wire["float32"].train_memory_mb  # the device computes in float32
    with pytest.raises(ValueError, match="lora_base_dtype is 'int8'; choose float32, float16 or bfloat16"):
        STRATEGIES["raffm"].with_options(lora_base_dtype="int8")


def test_the_server_distillation_step_distils_every_cut_into_the_whole_model_and_bad_settings_are_named() -> None:
    cm = CostModel.from_model(make("bert"))
    raffm = STRATEGIES["raffm"].with_options(nested_fractions=NESTED, server_distill_steps=5)
    recipe = raffm.server_distill_recipe(cm)
    assert recipe.nested == raffm.cuts(cm) and recipe.prior_correction == 0.0  # every cut; no labels, no prior
    assert recipe.lr_scale == 0.5 == raffm.server_distill_lr_scale
    device = raffm.recipe_for(ElasticSpec.full(cm.dims), cm).frozen  # frozen where devices freeze, and the head
    assert recipe.frozen - device == {n for n in cm.shapes if n.startswith(("classifier.", "bert.pooler."))}
    for bad, why in (({"server_distill_steps": -1}, "server_distill_steps is -1"),
                     ({"server_distill_steps": True}, "server_distill_steps is True"),
                     ({"server_distill_lr_scale": 0.0}, "server_distill_lr_scale is 0.0")):
        with pytest.raises(ValueError, match=why):
            raffm.with_options(**bad)
    for without_cuts in ("raffm", "fedavg"):
        with pytest.raises(ValueError, match="needs nested_fractions"):
            STRATEGIES[without_cuts].with_options(server_distill_steps=5)
