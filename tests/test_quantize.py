"""bitsandbytes emulators: the middle is really packed, and the client trains its adapter on top."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from offsite.client.train import LocalTrainer
from offsite.emulator.adapter import extract_adapter
from offsite.emulator.methods import MethodConfig
from offsite.emulator.blocks import find_blocks
from offsite.emulator.build import build
from offsite.emulator.bundle import load_bundle
from offsite.emulator.config import EmulatorConfig
from offsite.emulator.quantize import tensor_bytes_by_block
from offsite import lm
from offsite.tensors import spec_digest, spec_of
from offsite.textdata import read_texts
from offsite.demo.tiny import make_tiny_model

KINDS = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """Width 256, so per-block quantization constants are a realistic share of the bytes."""
    folder = make_tiny_model(tmp_path_factory.mktemp("wide"))
    config = AutoConfig.from_pretrained(str(folder))
    config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads = 256, 512, 4, 4
    config.head_dim = 64
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("mode, max_ratio", [("nf4", 0.3), ("int8", 0.3)])
def test_middle_blocks_are_packed(wide_model, tmp_path, mode, max_ratio):
    fp32 = build(str(wide_model), EmulatorConfig(emulator_layers=1), tmp_path / "fp32", show_progress=False)
    build(str(wide_model), EmulatorConfig(emulator_layers=1, quantize=mode), tmp_path / mode, show_progress=False)
    middle = fp32.plan.emulator_index(fp32.plan.kept_middle[0])
    full_bytes = tensor_bytes_by_block(tmp_path / "fp32" / "model.safetensors", "model.layers")
    packed = tensor_bytes_by_block(tmp_path / mode / "model.safetensors", "model.layers")
    assert packed[middle] <= max_ratio * full_bytes[middle]
    assert packed[0] == full_bytes[0]  # adapter blocks stay full precision
    model, _, plan = load_bundle(tmp_path / mode)
    blocks = find_blocks(model).blocks
    assert {type(m).__name__ for m in blocks[middle].modules()} >= {KINDS[mode]}
    assert KINDS[mode] not in {type(m).__name__ for m in blocks[0].modules()}
    manifest = json.loads((tmp_path / mode / "offsite-manifest.json").read_text())
    assert manifest["provenance"]["quantized"] == mode


@pytest.mark.parametrize("mode", ["nf4", "int8"])
@pytest.mark.parametrize("bf16", [False, True])
def test_client_trains_adapter_on_quantized_emulator(wide_model, client_data, tmp_path, mode, bf16):
    result = build(str(wide_model), EmulatorConfig(emulator_layers=1, quantize=mode), tmp_path / "b", show_progress=False)
    texts = read_texts(client_data[0] / "train.jsonl")
    trainer = LocalTrainer(tmp_path / "b", texts, texts[:10], max_length=64)
    start = result.skeleton
    out = trainer.train_round(start, spec_digest(spec_of(start)),
                              lm.TrainConfig(epochs=3, lr=3e-3, batch_size=8, bf16=bf16), show_progress=False)
    assert out.heldout_after < out.heldout_before
    assert spec_of(out.update) == spec_of(start)
    assert any(not torch.equal(out.update[k], start[k]) for k in start)
    middle = list(find_blocks(trainer.model).blocks[2].parameters())
    assert middle and all(not p.requires_grad and p.grad is None for p in middle)  # the packed middle is frozen
    assert set(extract_adapter(trainer.model, trainer.plan, on_emulator=True)) == set(start)


def test_gradients_through_nf4_middle_are_the_same_after_an_eval_pass(wide_model, tmp_path):
    """bitsandbytes' CPU eval kernel has no backward; evaluating first must not change training gradients."""
    build(str(wide_model), EmulatorConfig(emulator_layers=1, quantize="nf4"), tmp_path / "b", show_progress=False)
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))

    def bottom_grad(evaluate_first: bool) -> torch.Tensor:
        model, _, _ = load_bundle(tmp_path / "b")
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(ids)
        model.train()
        for p in model.parameters():
            p.requires_grad_(False)
        weight = find_blocks(model).blocks[0].self_attn.q_proj.weight
        weight.requires_grad_(True)
        model(ids, labels=ids).loss.backward()
        return weight.grad

    fresh, after_eval = bottom_grad(False), bottom_grad(True)
    assert fresh.abs().sum() > 0
    assert torch.allclose(fresh, after_eval, rtol=1e-4, atol=1e-7)


def test_eval_counts_real_parameters_of_a_packed_emulator(wide_model, client_data, tmp_path):
    from offsite.emulator.evaluate import compare_full_and_emulator
    build(str(wide_model), EmulatorConfig(emulator_layers=1), tmp_path / "fp32", show_progress=False)
    build(str(wide_model), EmulatorConfig(emulator_layers=1, quantize="nf4"), tmp_path / "nf4", show_progress=False)
    data = client_data[0] / "heldout.jsonl"
    fp32 = compare_full_and_emulator(str(wide_model), tmp_path / "fp32", data)["emulator"]
    nf4 = compare_full_and_emulator(str(wide_model), tmp_path / "nf4", data)["emulator"]
    assert nf4["params"] == fp32["params"] and nf4["bytes"] < fp32["bytes"]
    assert abs(nf4["loss"] - fp32["loss"]) < 0.05  # 4-bit middle of a random model: close, not equal


def test_qlora_style_client_lora_on_nf4_with_checkpointing_and_accumulation(wide_model, client_data, tmp_path):
    result = build(str(wide_model), EmulatorConfig(emulator_layers=1, quantize="nf4"), tmp_path / "b", show_progress=False)
    texts = read_texts(client_data[0] / "train.jsonl")
    trainer = LocalTrainer(tmp_path / "b", texts, texts[:10], max_length=64)
    start, lora = result.skeleton, MethodConfig("lora", r=4)

    def run(checkpointing):
        cfg = lm.TrainConfig(epochs=2, lr=1e-2, batch_size=4, grad_accum=2, gradient_checkpointing=checkpointing)
        return trainer.train_round(start, spec_digest(spec_of(start)), cfg, lora, show_progress=False)

    plain, checkpointed = run(False), run(True)
    assert checkpointed.heldout_after < checkpointed.heldout_before
    assert set(checkpointed.update) == set(plain.update) and all("lora_" in k for k in plain.update)
    bottom = [k for k in plain.update if ".layers.0." in k]
    assert bottom and all(checkpointed.update[k].abs().sum() > 0 for k in bottom)  # gradients reached the bottom block
    for k in plain.update:  # recomputing activations changes memory, not the result
        torch.testing.assert_close(checkpointed.update[k], plain.update[k], atol=1e-5, rtol=1e-4)
    assert checkpointed.stats.peak_memory_bytes > 0 and checkpointed.stats.steps == plain.stats.steps == 10
