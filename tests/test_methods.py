"""Adapter methods: only method tensors train and travel, under canonical names; an update merges into
the dense adapter exactly (the emulator with the method attached and the emulator with the merged
adapter give the same logits); and averaging merged adapters is exact where averaging factors is not."""
import dataclasses

import pytest
import torch

from offsite.emulator import methods
from offsite.emulator.adapter import extract_adapter, load_adapter
from offsite.emulator.build import make_emulator
from offsite.emulator.extras import extra_names
from offsite.emulator.methods import MethodConfig
from offsite.emulator.plan import SplitPlan
from offsite.emulator.plugin import export, load_export, plug_in
from offsite.errors import ConfigError, InvalidUpdateError
from tests.test_families import IDS, tiny

PLAN = SplitPlan.uniform(6, 2, 2, 1)
CASES = [("llama", "lora"), ("gpt2", "lora"), ("opt", "lora"), ("llama", "adalora"), ("llama", "ia3"), ("gpt2", "ia3"),
         ("llama", "bitfit"), ("opt", "bitfit"), ("llama", "full")]
ADDED = [("llama", "prompt"), ("gpt2", "prompt"), ("llama", "prefix"), ("opt", "prefix"), ("gpt_neox", "prefix"),
         ("llama", "bottleneck"), ("gpt2", "bottleneck"), ("opt", "bottleneck"), ("bloom", "bottleneck"), ("falcon", "bottleneck")]


def emulator(family):
    model = tiny(family)
    make_emulator(model, PLAN)
    return model


def initial(model, cfg, plan=PLAN):
    """The job's first global adapter: the base's adapter blocks and the method's fresh extras."""
    torch.manual_seed(0)
    return {**extract_adapter(model, plan, on_emulator=True), **methods.fresh_extras(model, plan, cfg)}


def attached(family, cfg, plan=PLAN):
    model = make_emulator(tiny(family), plan)
    return methods.attach(methods.apply(model, plan, cfg, initial(model, cfg, plan)), plan, cfg)


def _randomize(update, seed=0):
    """A trained-looking update: lora_B starts at zero and IA3 at one, which would hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in update.items()}


@pytest.mark.parametrize("family, name", CASES + ADDED)
def test_only_method_tensors_train_and_travel_under_canonical_names(family, name):
    cfg = MethodConfig(name, r=2, virtual_tokens=4, bottleneck_dim=4)  # at width 32 rank 8 is half the weights
    model, params = attached(family, cfg)
    update = methods.trainable_state(model, PLAN, cfg)
    assert len(params) == len(update) > 0 and sum(p.numel() for p in params) == sum(v.numel() for v in update.values())
    assert all(p.requires_grad for p in params)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(p.numel() for p in params)
    if name in methods.VIRTUAL:
        assert list(update) == [methods.PROMPT]
        return
    layers = "h" if family in ("gpt2", "bloom", "falcon") else "layers"
    blocks = {int(k.split(".")[k.split(".").index(layers) + 1]) for k in update}
    assert blocks == set(PLAN.adapter_blocks)  # canonical = the full model's indices: 0, 1, 4, 5
    dense = sum(v.numel() for v in extract_adapter(emulator(family), PLAN, on_emulator=True).values())
    if name == "full":
        assert sum(v.numel() for v in update.values()) == dense
    else:
        assert sum(v.numel() for v in update.values()) < dense / 4  # a PEFT upload is a fraction of the blocks


@pytest.mark.parametrize("family, name", CASES)
def test_an_update_merges_into_the_dense_adapter_exactly(family, name):
    cfg = MethodConfig(name)
    trained, _ = attached(family, cfg)
    update = _randomize(methods.trainable_state(trained, PLAN, cfg))
    trained, _ = attached(family, cfg)  # a fresh one, loaded with the update
    if name in ("lora", "adalora", "ia3"):
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(trained, methods._emulator_names(update, trained.get_base_model(), PLAN))
    else:
        load_adapter(trained, PLAN, {**extract_adapter(trained, PLAN, True), **update}, on_emulator=True)
    start = extract_adapter(emulator(family), PLAN, on_emulator=True)
    merged = emulator(family)
    load_adapter(merged, PLAN, methods.propose(emulator(family), PLAN, cfg, start, update), on_emulator=True)
    with torch.no_grad():
        expected, got = trained.eval()(IDS).logits, merged.eval()(IDS).logits
    assert not torch.allclose(got, emulator(family)(IDS).logits, atol=1e-4)  # the update did change something
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_lora_average_is_of_merged_weights_not_of_factors():
    cfg = MethodConfig("lora", r=2, alpha=2.0)
    base = emulator("llama")
    model, _ = attached("llama", cfg)
    u1, u2 = (_randomize(methods.trainable_state(model, PLAN, cfg), seed) for seed in (1, 2))
    start = extract_adapter(base, PLAN, on_emulator=True)
    p1, p2 = (methods.propose(emulator("llama"), PLAN, cfg, start, u) for u in (u1, u2))
    exact = {k: (p1[k] + p2[k]) / 2 for k in start}
    name = "model.layers.0.self_attn.q_proj"
    a = [u[f"{name}.lora_A.weight"] for u in (u1, u2)]
    b = [u[f"{name}.lora_B.weight"] for u in (u1, u2)]
    mean_of_products = (b[0] @ a[0] + b[1] @ a[1]) / 2  # scale alpha / r = 1
    product_of_means = ((b[0] + b[1]) / 2) @ ((a[0] + a[1]) / 2)
    torch.testing.assert_close(exact[f"{name}.weight"], start[f"{name}.weight"] + mean_of_products, atol=1e-6, rtol=1e-6)
    assert (mean_of_products - product_of_means).abs().max() > 1e-4  # the naive average would be wrong


@pytest.mark.parametrize("family, name", [c for c in CASES if MethodConfig(c[1]).merges])
def test_the_mean_of_many_proposals_in_one_merge_is_the_mean_of_each_merged(family, name):
    cfg = MethodConfig(name, r=2, bottleneck_dim=4)
    model, _ = attached(family, cfg)
    updates = [_randomize(methods.trainable_state(model, PLAN, cfg), seed) for seed in range(3)]
    weights = [1.0, 5.0, 2.5]
    start = initial(emulator(family), cfg)
    proposals = [methods.propose(emulator(family), PLAN, cfg, start, u) for u in updates]
    expected = {k: sum(p[k].double() * w for p, w in zip(proposals, weights)) / sum(weights) for k in proposals[0]}
    got = methods.propose_mean(emulator(family), PLAN, cfg, start, updates, weights)
    assert set(got) == set(expected) and all(v.dtype == torch.float32 for v in got.values())
    for k in expected:
        torch.testing.assert_close(got[k].double(), expected[k], atol=1e-6, rtol=1e-5)
    assert any((expected[k] - proposals[0][k]).abs().max() > 1e-3 for k in expected)  # the weights mattered


def test_a_mean_of_no_updates_or_of_bad_weights_is_refused():
    cfg = MethodConfig("lora", r=2)
    start = initial(emulator("llama"), cfg)
    for updates, weights in (([], []), ([{}], [0.0]), ([{}], [float("nan")]), ([{}, {}], [1.0])):
        with pytest.raises(InvalidUpdateError, match="positive finite weights"):
            methods.propose_mean(emulator("llama"), PLAN, cfg, start, updates, weights)
    with pytest.raises(ValueError, match="does not merge"):
        methods.propose_mean(None, PLAN, MethodConfig("full"), start, [start], [1.0])


@pytest.mark.parametrize("kwargs", [dict(name="prefix-magic"), dict(name="lora", r=0), dict(name="lora", dropout=1.0),
                                    dict(name="prompt", virtual_tokens=0), dict(name="bottleneck", bottleneck_dim=0)])
def test_bad_method_settings(kwargs):
    with pytest.raises(ConfigError):
        MethodConfig(**kwargs)


def test_targets_that_do_not_exist_are_named():
    with pytest.raises(ConfigError, match="no linear layer named"):
        attached("llama", MethodConfig("lora", target_modules=("c_attn",)))


NO_DROP = SplitPlan.uniform(6, 2, 2, 2)  # the emulator is the whole model: plug-in must change nothing


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "bloom", "falcon", "gpt_neox"])
def test_a_fresh_bottleneck_is_the_identity(family):
    cfg = MethodConfig("bottleneck", bottleneck_dim=4)
    model = emulator(family)
    with torch.no_grad():
        reference = model(IDS).logits
        got = methods.apply(model, PLAN, cfg, initial(model, cfg))(IDS).logits
    torch.testing.assert_close(got, reference)


@pytest.mark.parametrize("family, name", [("llama", "prompt"), ("gpt2", "prompt"), ("llama", "prefix"), ("opt", "prefix"),
                                          ("llama", "bottleneck"), ("gpt2", "bottleneck"), ("llama", "lora")])
def test_a_trained_method_plugs_into_the_full_model(family, name):
    """With nothing dropped, the full model with the global adapter must equal the emulator with it."""
    cfg = MethodConfig(name, r=2, virtual_tokens=4, bottleneck_dim=4)
    model, _ = attached(family, cfg, NO_DROP)
    start = initial(make_emulator(tiny(family), NO_DROP), cfg, NO_DROP)
    scratch = make_emulator(tiny(family), NO_DROP)
    adapter = methods.propose(scratch, NO_DROP, cfg, start, _randomize(methods.trainable_state(model, NO_DROP, cfg)))
    on_emulator = methods.apply(make_emulator(tiny(family), NO_DROP), NO_DROP, cfg, adapter)
    on_full = methods.apply(tiny(family), NO_DROP, cfg, adapter, on_emulator=False)
    with torch.no_grad():
        expected, got = on_emulator(input_ids=IDS).logits, on_full(input_ids=IDS).logits
        assert not torch.allclose(got[:, -IDS.shape[1]:], tiny(family)(IDS).logits, atol=1e-4)
    torch.testing.assert_close(got, expected)


def test_prefix_of_a_dropped_block_is_the_nearest_kept_blocks():
    plan = SplitPlan.uniform(8, 2, 2, 2)  # the emulator runs blocks 0 1 2 5 6 7
    assert plan.emulator_order == (0, 1, 2, 5, 6, 7)
    slots = torch.arange(6.0).repeat_interleave(3).repeat(4, 1)  # 4 tokens, 6 layers of width 3, each = its slot
    full = methods._full_depth(slots, plan).reshape(4, 8, 3)
    assert full[0, :, 0].tolist() == [0, 1, 2, 2, 3, 3, 4, 5]  # block 3 <- 2, block 4 <- 5
    assert torch.equal(full[1], full[0])


@pytest.mark.parametrize("name", ["prompt", "prefix", "bottleneck", "lora"])
def test_export_loads_back_to_the_same_model(tiny_model, tmp_path, name):
    from transformers import AutoModelForCausalLM
    cfg = MethodConfig(name, r=2, virtual_tokens=4, bottleneck_dim=4)
    plan = SplitPlan.uniform(6, 2, 2, 1)
    def emu():
        return make_emulator(AutoModelForCausalLM.from_pretrained(str(tiny_model)), plan)
    start = initial(emu(), cfg, plan)
    trained, _ = methods.attach(methods.apply(emu(), plan, cfg, start), plan, cfg)
    adapter = methods.propose(emu(), plan, cfg, start, _randomize(methods.trainable_state(trained, plan, cfg)))
    plugged, tokenizer = plug_in(str(tiny_model), plan, adapter, cfg)
    loaded, _ = load_export(export(plugged, tokenizer, tmp_path / "export"))
    ids = IDS % plugged.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, plugged.eval()(input_ids=ids).logits)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))  # the folder itself is a plain model
    assert not any("bottleneck" in k for k in plain.state_dict())


# --- what the adapter trains beyond its blocks, through lora -----------------------------------------
EXTRA_CASES = [("llama", ("norm", "head")), ("llama", ("norm", "head", "embeddings")), ("gpt_neox", ("head", "embeddings")),
               ("gpt2", ("norm", "head")), ("opt", ("embeddings",)), ("gemma2", ("norm", "head")), ("bloom", ("head",))]
TIED = {"gpt2", "opt", "gemma2", "bloom"}  # tiny(family): the head is the input embedding matrix


def with_extras(family, kinds):
    return dataclasses.replace(PLAN, extras=extra_names(tiny(family), kinds))


def _outer(update):
    return {k for k in update if not any(f".{b}." in k for b in ("layers", "h"))}


@pytest.mark.parametrize("family, kinds", EXTRA_CASES)
def test_extras_through_lora_train_travel_and_merge_exactly(family, kinds):
    """Head and embeddings get LoRA factors (a tied head: the embedding's, nothing of its own), the norm
    trains in full beside them; the merged dense adapter gives the logits the trained model gave."""
    cfg, plan = MethodConfig("lora", r=2), with_extras(family, kinds)
    model, params = attached(family, cfg, plan)
    update = methods.trainable_state(model, plan, cfg)
    assert sum(p.numel() for p in params) == sum(v.numel() for v in update.values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(p.numel() for p in params)
    base = tiny(family)
    table, head = (next(n for n, m in base.named_modules() if m is x) for x in (base.get_input_embeddings(), base.get_output_embeddings()))
    expected = set()
    if "embeddings" in kinds or ("head" in kinds and family in TIED):
        expected |= {f"{table}.lora_embedding_A", f"{table}.lora_embedding_B"}
    if "head" in kinds and family not in TIED:
        expected |= {f"{head}.lora_A.weight", f"{head}.lora_B.weight"}
    if "norm" in kinds:
        expected |= {n for n in plan.extras if not n.startswith((table, head))}
    assert _outer(update) == expected
    assert all(update[n].dim() == 1 for n in expected if "lora" not in n)  # the norm, in full
    assert sum(update[n].numel() for n in expected) < sum(p.numel() for n, p in base.named_parameters() if n in plan.extras) / 4

    update = _randomize(update)
    trained, _ = attached(family, cfg, plan)  # a fresh one, loaded with the update
    from peft import set_peft_model_state_dict
    dense = {k: v for k, v in update.items() if k in plan.extras}
    set_peft_model_state_dict(trained, methods._emulator_names({k: v for k, v in update.items() if k not in dense},
                                                               trained.get_base_model(), plan))
    with torch.no_grad():
        for name, p in methods._dense_parameters(trained, list(dense)).items():
            p.copy_(dense[name])
    start = extract_adapter(make_emulator(tiny(family), plan), plan, on_emulator=True)
    adapter = methods.propose(make_emulator(tiny(family), plan), plan, cfg, start, update)
    assert set(methods.touched(cfg, update)) <= set(adapter) and {n for n in plan.extras} <= methods.touched(cfg, update)
    merged = make_emulator(tiny(family), plan)
    load_adapter(merged, plan, adapter, on_emulator=True)
    with torch.no_grad():
        expected_logits, got = trained.eval()(IDS).logits, merged.eval()(IDS).logits
        before = make_emulator(tiny(family), plan)(IDS).logits
    assert (got - before).abs().max() > 1.0  # the update did change something
    torch.testing.assert_close(got, expected_logits, atol=1e-4, rtol=1e-5)  # a tied head's change counted once


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_a_tied_head_gives_its_gradient_to_the_embedding_factors(family):
    """The gradient the optimizer sees on the embedding's factors is that of the loss through the shared
    matrix W + scale (B A)^T, as both the input lookup and the head use it."""
    cfg, plan = MethodConfig("lora", r=2, alpha=4.0), with_extras(family, ("head",))
    model, _ = attached(family, cfg, plan)
    table = model.get_input_embeddings()
    a, b = table.lora_embedding_A["default"], table.lora_embedding_B["default"]
    with torch.no_grad():
        a.normal_(std=0.1)  # peft starts A at zero, which would hide the head's share of B's gradient
    model.train(False)
    model(IDS, labels=IDS).loss.backward()

    reference = make_emulator(tiny(family), plan).eval()
    name = plan.extras[0]
    a0, b0 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    weight = reference.get_parameter(name).detach() + (b0 @ a0).t() * 2.0
    lora = {n.replace("base_model.model.", "").replace(".base_layer", ""): p.detach()
            for n, p in model.named_parameters() if ".base_layer." in n}  # the blocks' (unchanged: B = 0) weights
    loss = torch.func.functional_call(reference, {**lora, name: weight}, (IDS,), {"labels": IDS}).loss
    loss.backward()
    torch.testing.assert_close(a.grad, a0.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(b.grad, b0.grad, atol=1e-6, rtol=1e-4)
    head = model.get_base_model().get_output_embeddings()
    assert not list(head.lora_A.parameters()) and not list(head.lora_B.parameters())  # one tensor, no twin


@pytest.mark.parametrize("family, kinds", [("llama", ("norm", "head", "embeddings")), ("gpt2", ("norm", "head"))])
def test_the_mean_of_lora_updates_with_extras_in_one_merge_is_the_mean_of_each_merged(family, kinds):
    cfg, plan = MethodConfig("lora", r=2), with_extras(family, kinds)
    model, _ = attached(family, cfg, plan)
    updates = [_randomize(methods.trainable_state(model, plan, cfg), seed) for seed in range(3)]
    weights = [1.0, 5.0, 2.5]
    start = initial(make_emulator(tiny(family), plan), cfg, plan)
    proposals = [methods.propose(make_emulator(tiny(family), plan), plan, cfg, start, u) for u in updates]
    expected = {k: sum(p[k].double() * w for p, w in zip(proposals, weights)) / sum(weights) for k in proposals[0]}
    got = methods.propose_mean(make_emulator(tiny(family), plan), plan, cfg, start, updates, weights)
    assert set(got) == set(expected)
    for k in expected:
        torch.testing.assert_close(got[k].double(), expected[k], atol=1e-6, rtol=1e-5)
    assert all((expected[n] - start[n].double()).abs().max() > 1e-3 for n in plan.extras)  # every extra moved


def test_extras_need_full_or_lora():
    plan = with_extras("llama", ("head",))
    with pytest.raises(ConfigError, match="needs method full or lora, not ia3"):
        attached("llama", MethodConfig("ia3"), plan)
