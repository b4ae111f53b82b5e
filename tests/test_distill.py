"""Emulator distillation: the recipe's loss, that it helps, and that it resumes from checkpoints."""
import dataclasses

import pytest
import torch

from offsite import lm
from offsite.emulator import distill as distill_mod
from offsite.emulator.blocks import find_blocks
from offsite.emulator.build import build, load_base, make_emulator
from offsite.emulator.config import EmulatorConfig
from offsite.emulator.distill import DistillConfig, distill, nmse
from offsite.emulator.plan import SplitPlan
from offsite.errors import ConfigError
from offsite.textdata import read_texts

PLAN = SplitPlan.uniform(6, 2, 2, 1)


def test_nmse_is_scale_free_and_masked():
    t = torch.randn(2, 5, 8)
    mask = torch.ones(2, 5)
    assert nmse(t, t, mask) == 0
    assert torch.allclose(nmse(t, torch.zeros_like(t), mask), torch.tensor(1.0))
    assert torch.allclose(nmse(100 * t, 100 * t + 100 * 0.1, mask), nmse(t, t + 0.1, mask), rtol=1e-4)
    mask[1] = 0
    assert torch.allclose(nmse(t, t.clone().index_fill_(0, torch.tensor([1]), 9.0), mask), torch.tensor(0.0))


def _setup(tiny_model, client_data):
    teacher, tokenizer = load_base(str(tiny_model))
    student = make_emulator(load_base(str(tiny_model))[0], PLAN)
    texts = read_texts(client_data[0] / "train.jsonl")
    windows = lm.pack(lm.encode(tokenizer, texts, 10**9), 32)
    return teacher, student, tokenizer, windows


def _middle_error(teacher, student, windows, pad):
    ids, mask, _ = next(lm.batches(windows[:8], 8, pad))
    with torch.no_grad():
        t = teacher(input_ids=ids, output_hidden_states=True).hidden_states[6 - PLAN.top]
        s = student(input_ids=ids, output_hidden_states=True).hidden_states[5 - PLAN.top]
    return float(nmse(t, s, mask.float()))


def test_distillation_moves_only_the_middle_toward_the_teacher(tiny_model, client_data):
    teacher, student, tok, windows = _setup(tiny_model, client_data)
    before = _middle_error(teacher, student, windows, tok.pad_token_id)
    frozen = {k: v.clone() for k, v in find_blocks(student).blocks[0].state_dict().items()}
    stats = distill(teacher, student, PLAN, windows, tok.pad_token_id,
                    DistillConfig(steps=30, lr=3e-3, batch_size=8, seq_len=32), show_progress=False)
    assert stats.steps == 30 and stats.resumed_from == 0
    assert _middle_error(teacher, student, windows, tok.pad_token_id) < 0.7 * before
    after = find_blocks(student).blocks[0].state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # adapter blocks stay frozen


def test_interrupted_distillation_resumes_to_the_same_weights(tiny_model, client_data, tmp_path, monkeypatch):
    cfg = DistillConfig(steps=6, lr=3e-3, batch_size=4, seq_len=32, checkpoint_every=2)
    teacher, straight, tok, windows = _setup(tiny_model, client_data)
    distill(teacher, straight, PLAN, windows, tok.pad_token_id, cfg, tmp_path / "a", show_progress=False)

    real_save = distill_mod._save_checkpoint

    def crash_after_first(folder, student, opt, step, c):
        real_save(folder, student, opt, step, c)
        if step == 4:
            raise KeyboardInterrupt("simulated crash")

    _, resumed, _, _ = _setup(tiny_model, client_data)
    monkeypatch.setattr(distill_mod, "_save_checkpoint", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        distill(teacher, resumed, PLAN, windows, tok.pad_token_id, cfg, tmp_path / "b", show_progress=False)
    monkeypatch.setattr(distill_mod, "_save_checkpoint", real_save)
    _, fresh, _, _ = _setup(tiny_model, client_data)
    stats = distill(teacher, fresh, PLAN, windows, tok.pad_token_id, cfg, tmp_path / "b", show_progress=False)
    assert stats.resumed_from == 4
    for (name, a), b in zip(straight.state_dict().items(), fresh.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    with pytest.raises(ConfigError, match="different distillation run"):
        distill(teacher, fresh, PLAN, windows, tok.pad_token_id, DistillConfig(steps=7, seq_len=32, checkpoint_every=2),
                tmp_path / "b", show_progress=False)
    flipped = dataclasses.replace(cfg, bf16=not cfg.bf16, checkpoint_every=3)  # how it computes, not what it trains
    assert distill(teacher, fresh, PLAN, windows, tok.pad_token_id, flipped, tmp_path / "b", show_progress=False).resumed_from == 6


def test_build_with_distillation_records_it_in_the_manifest(tiny_model, client_data, tmp_path):
    import json
    cfg = EmulatorConfig(emulator_layers=1, distill_data=str(client_data[0] / "train.jsonl"), distill_steps=4)
    build(str(tiny_model), cfg, tmp_path / "bundle", show_progress=False)
    manifest = json.loads((tmp_path / "bundle" / "offsite-manifest.json").read_text())
    assert manifest["provenance"]["distillation"]["steps"] == 4
    assert len(manifest["provenance"]["distillation"]["data_sha256"]) == 64


def test_distill_steps_without_data_is_refused():
    with pytest.raises(ConfigError, match="distill_data"):
        EmulatorConfig(distill_steps=5)
