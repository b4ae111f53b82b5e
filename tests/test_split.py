"""The split: plan arithmetic, emulator surgery, and exact plug-in of an untouched adapter."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from offsite.emulator.adapter import extract_adapter, load_adapter
from offsite.emulator.blocks import find_blocks, keep_blocks
from offsite.emulator.build import build, load_base, make_emulator
from offsite.emulator.bundle import load_bundle, verify_bundle
from offsite.emulator.config import EmulatorConfig
from offsite.emulator.plan import SplitPlan
from offsite.emulator.plugin import export, plug_in
from offsite.errors import ConfigError, IntegrityError, UnsupportedModelError


@pytest.mark.parametrize("n, bottom, top, keep, expected", [
    (8, 2, 2, 2, (2, 5)),
    (8, 2, 2, 4, (2, 3, 4, 5)),
    (8, 2, 2, 1, (4,)),
    (24, 2, 2, 8, (2, 5, 7, 10, 13, 16, 18, 21)),
])
def test_uniform_plan_keeps_evenly_spaced_middle_blocks(n, bottom, top, keep, expected):
    plan = SplitPlan.uniform(n, bottom, top, keep)
    assert plan.kept_middle == expected
    assert plan.adapter_blocks == tuple(range(bottom)) + tuple(range(n - top, n))
    assert len(plan.emulator_order) == bottom + keep + top


@pytest.mark.parametrize("args", [(4, 2, 2, 1), (8, 0, 2, 2), (8, 2, 2, 5), (8, 2, 2, 0)])
def test_bad_plans_are_refused(args):
    with pytest.raises(ConfigError):
        SplitPlan.uniform(*args)


def _ids(model):
    return torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def test_untouched_adapter_plugs_back_to_identical_logits(tiny_model):
    full, _ = load_base(str(tiny_model))
    plan = SplitPlan.uniform(6, 2, 2, 1)
    adapter = extract_adapter(full, plan, on_emulator=False)
    with torch.no_grad():
        reference = full(_ids(full)).logits
    plugged, _ = plug_in(str(tiny_model), plan, adapter)
    with torch.no_grad():
        assert torch.equal(plugged(_ids(full)).logits, reference)


def test_trained_adapter_moves_from_emulator_to_full_model(tiny_model):
    plan = SplitPlan.uniform(6, 2, 2, 1)
    emulator, _ = load_base(str(tiny_model))
    make_emulator(emulator, plan)
    with torch.no_grad():
        for p in emulator.parameters():
            p.add_(0.01)
    adapter = extract_adapter(emulator, plan, on_emulator=True)
    full, _ = plug_in(str(tiny_model), plan, adapter)
    top = plan.adapter_blocks[-1]
    assert torch.equal(find_blocks(full).blocks[top].mlp.up_proj.weight,
                       find_blocks(emulator).blocks[plan.emulator_index(top)].mlp.up_proj.weight)


def test_emulator_that_drops_nothing_reproduces_the_model(tiny_model):
    full, _ = load_base(str(tiny_model))
    emulator, _ = load_base(str(tiny_model))
    make_emulator(emulator, SplitPlan.uniform(6, 2, 2, 2))
    with torch.no_grad():
        assert torch.equal(emulator(_ids(full)).logits, full(_ids(full)).logits)


def test_emulator_generates_with_kv_cache(tiny_model):
    emulator, _ = load_base(str(tiny_model))
    make_emulator(emulator, SplitPlan.uniform(6, 2, 2, 1))
    assert emulator.config.num_hidden_layers == 5
    out = emulator.generate(_ids(emulator)[:1], max_new_tokens=5, do_sample=False, use_cache=True)
    assert out.shape == (1, 17)


def test_layer_types_are_sliced_with_the_blocks():
    config = AutoConfig.for_model("qwen2", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                  num_attention_heads=2, num_key_value_heads=1, layer_types=["full_attention", "sliding_attention"] * 2,
                                  use_sliding_window=True, sliding_window=8)
    model = AutoModelForCausalLM.from_config(config)
    keep_blocks(model, [0, 1, 3])
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert [b.self_attn.layer_idx for b in find_blocks(model).blocks] == [0, 1, 2]
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False)


def test_model_without_blocks_is_refused_by_type():
    class Odd(torch.nn.Module):
        config = AutoConfig.for_model("llama", num_hidden_layers=3)

    with pytest.raises(UnsupportedModelError, match="llama"):
        find_blocks(Odd())


def test_bundle_round_trip_and_tamper_detection(tiny_model, tmp_path):
    result = build(str(tiny_model), EmulatorConfig(emulator_layers=1), tmp_path / "bundle")
    assert result.adapter_params == sum(t.numel() for t in result.skeleton.values())
    model, tokenizer, plan = load_bundle(tmp_path / "bundle")
    assert plan == result.plan and model.config.num_hidden_layers == 5
    weights = tmp_path / "bundle" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.safetensors"):
        verify_bundle(tmp_path / "bundle")


def test_export_loads_with_plain_transformers(tiny_model, tmp_path):
    full, tokenizer = load_base(str(tiny_model))
    export(full, tokenizer, tmp_path / "export")
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"))
    with torch.no_grad():
        assert torch.equal(again(_ids(full)).logits, full(_ids(full)).logits)


def test_adapter_with_wrong_names_is_refused(tiny_model):
    full, _ = load_base(str(tiny_model))
    plan = SplitPlan.uniform(6, 2, 2, 1)
    adapter = extract_adapter(full, plan, on_emulator=False)
    adapter.pop(next(iter(adapter)))
    with pytest.raises(Exception, match="missing"):
        load_adapter(full, plan, adapter, on_emulator=False)


@pytest.mark.parametrize("family, kinds, expected", [
    ("llama", ("norm",), ("model.norm.weight",)),
    ("llama", ("head", "embeddings"), ("lm_head.weight", "model.embed_tokens.weight")),  # untied: two matrices
    ("gpt2", ("norm", "head"), ("transformer.ln_f.bias", "transformer.ln_f.weight", "transformer.wte.weight")),  # tied
    ("opt", ("norm",), ("model.decoder.final_layer_norm.bias", "model.decoder.final_layer_norm.weight")),
    ("bloom", ("norm",), ("transformer.ln_f.bias", "transformer.ln_f.weight")),  # not word_embeddings_layernorm
    ("gpt_neox", ("head",), ("lm_head.weight",)),
])
def test_what_the_adapter_trains_beyond_its_blocks_is_named_per_family(family, kinds, expected):
    from offsite.emulator.extras import extra_names
    from tests.test_families import tiny
    assert extra_names(tiny(family), kinds) == expected


def test_a_plan_with_extras_travels_and_an_older_one_reads_without(tiny_model, tmp_path):
    plan = SplitPlan(6, 2, 2, (3,), extras=("model.norm.weight",))
    assert SplitPlan.from_dict(plan.to_dict()) == plan
    assert SplitPlan.from_dict({"num_blocks": 6, "bottom": 2, "top": 2, "kept_middle": [3]}).extras == ()
    with pytest.raises(ConfigError, match="train_extra"):
        EmulatorConfig(train_extra=("lm_head",))
    result = build(str(tiny_model), EmulatorConfig(emulator_layers=1, train_extra=("norm", "embeddings")), tmp_path / "b",
                   show_progress=False)
    assert result.plan.extras == ("model.embed_tokens.weight", "model.norm.weight")  # the tiny base ties its head
    assert set(result.plan.extras) <= set(result.skeleton)  # the job's first global adapter holds them
    emulator, _, plan = load_bundle(tmp_path / "b")
    assert plan == result.plan  # the bundle's manifest carries them to the client
    full, _ = load_base(str(tiny_model))
    torch.testing.assert_close(result.skeleton["model.norm.weight"], full.state_dict()["model.norm.weight"])
    changed = {k: v + 0.5 for k, v in result.skeleton.items()}
    load_adapter(full, plan, changed, on_emulator=False)  # plug-in writes them into the full model too
    torch.testing.assert_close(full.state_dict()["model.norm.weight"], changed["model.norm.weight"])
    torch.testing.assert_close(full.get_output_embeddings().weight, changed["model.embed_tokens.weight"])  # tied: the head too
