"""Adapter methods: only method tensors train and travel, under canonical names; an update merges into
the dense adapter exactly (the emulator with the method attached and the emulator with the merged
adapter give the same logits); and averaging merged adapters is exact where averaging factors is not."""
import pytest
import torch

from offsite.emulator import methods
from offsite.emulator.adapter import extract_adapter, load_adapter
from offsite.emulator.build import make_emulator
from offsite.emulator.methods import MethodConfig
from offsite.emulator.plan import SplitPlan
from offsite.errors import ConfigError
from tests.test_families import IDS, tiny

PLAN = SplitPlan.uniform(6, 2, 2, 1)
CASES = [("llama", "lora"), ("gpt2", "lora"), ("opt", "lora"), ("llama", "adalora"), ("llama", "ia3"), ("gpt2", "ia3"),
         ("llama", "bitfit"), ("opt", "bitfit"), ("llama", "full")]


def emulator(family):
    model = tiny(family)
    make_emulator(model, PLAN)
    return model


def _randomize(update, seed=0):
    """A trained-looking update: lora_B starts at zero and IA3 at one, which would hide mistakes."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in update.items()}


@pytest.mark.parametrize("family, name", CASES)
def test_only_method_tensors_train_and_travel_under_canonical_names(family, name):
    cfg = MethodConfig(name, r=2)  # at width 32 a rank-8 LoRA would be half the size of the weights
    attached, params = methods.attach(emulator(family), PLAN, cfg)
    update = methods.trainable_state(attached, PLAN, cfg)
    assert len(params) == len(update) > 0 and sum(p.numel() for p in params) == sum(v.numel() for v in update.values())
    assert all(p.requires_grad for p in params)
    assert sum(p.numel() for p in attached.parameters() if p.requires_grad) == sum(p.numel() for p in params)
    blocks = {int(k.split(".")[k.split(".").index("h" if family == "gpt2" else "layers") + 1]) for k in update}
    assert blocks == set(PLAN.adapter_blocks)  # canonical = the full model's indices: 0, 1, 4, 5
    dense = sum(v.numel() for v in extract_adapter(emulator(family), PLAN, on_emulator=True).values())
    if name == "full":
        assert sum(v.numel() for v in update.values()) == dense
    else:
        assert sum(v.numel() for v in update.values()) < dense / 4  # a PEFT upload is a fraction of the blocks


@pytest.mark.parametrize("family, name", CASES)
def test_an_update_merges_into_the_dense_adapter_exactly(family, name):
    cfg = MethodConfig(name)
    trained, _ = methods.attach(emulator(family), PLAN, cfg)
    update = _randomize(methods.trainable_state(trained, PLAN, cfg))
    trained, _ = methods.attach(emulator(family), PLAN, cfg)  # a fresh one, loaded with the update
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
    attached, _ = methods.attach(emulator("llama"), PLAN, cfg)
    u1, u2 = (_randomize(methods.trainable_state(attached, PLAN, cfg), seed) for seed in (1, 2))
    start = extract_adapter(base, PLAN, on_emulator=True)
    exact = {k: (methods.propose(emulator("llama"), PLAN, cfg, start, u1)[k] +
                 methods.propose(emulator("llama"), PLAN, cfg, start, u2)[k]) / 2 for k in start}
    name = "model.layers.0.self_attn.q_proj"
    a = [u[f"{name}.lora_A.weight"] for u in (u1, u2)]
    b = [u[f"{name}.lora_B.weight"] for u in (u1, u2)]
    mean_of_products = (b[0] @ a[0] + b[1] @ a[1]) / 2  # scale alpha / r = 1
    product_of_means = ((b[0] + b[1]) / 2) @ ((a[0] + a[1]) / 2)
    torch.testing.assert_close(exact[f"{name}.weight"], start[f"{name}.weight"] + mean_of_products, atol=1e-6, rtol=1e-6)
    assert (mean_of_products - product_of_means).abs().max() > 1e-4  # the naive average would be wrong


@pytest.mark.parametrize("kwargs", [dict(name="prefix-magic"), dict(name="lora", r=0), dict(name="lora", dropout=1.0)])
def test_bad_method_settings(kwargs):
    with pytest.raises(ConfigError):
        MethodConfig(**kwargs)


def test_targets_that_do_not_exist_are_named():
    with pytest.raises(ConfigError, match="no linear layer named"):
        methods.attach(emulator("llama"), PLAN, MethodConfig("lora", target_modules=("c_attn",)))
