"""Local training is repeatable, resumes from its checkpoint exactly, and accumulates gradients."""
import pytest
import torch

from offsite import lm
from offsite.checkpoint import Checkpointer
from offsite.client.train import LocalTrainer
from offsite.emulator.build import build
from offsite.emulator.config import EmulatorConfig
from offsite.emulator.methods import MethodConfig
from offsite.tensors import spec_digest, spec_of
from offsite.textdata import read_texts


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def trainer(tiny_model, client_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    result = build(str(tiny_model), EmulatorConfig(emulator_layers=1), out / "b", show_progress=False)
    texts = read_texts(client_data[0] / "train.jsonl")
    return LocalTrainer(out / "b", texts, texts[:8], max_length=64), result.skeleton


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_run_killed_mid_training_resumes_to_the_same_update(trainer, tmp_path, method):
    local, start = trainer
    cfg, digest = lm.TrainConfig(epochs=2, lr=3e-3, batch_size=8, seed=5), spec_digest(spec_of(start))
    unbroken = local.train_round(start, digest, cfg, MethodConfig(method), show_progress=False).update
    again = local.train_round(start, digest, cfg, MethodConfig(method), show_progress=False).update
    assert all(torch.equal(unbroken[k], again[k]) for k in unbroken)  # fixed seeds: repeatable

    checkpoint = Checkpointer(tmp_path, key="round-0", every=3)

    def die_at_step_7(step, total):
        if step == 7:  # after the checkpoint at step 6
            raise Interrupted()

    with pytest.raises(Interrupted):
        local.train_round(start, digest, cfg, MethodConfig(method), show_progress=False, on_step=die_at_step_7,
                          checkpoint=checkpoint)
    assert checkpoint.path.is_file()
    steps = []
    resumed = local.train_round(start, digest, cfg, MethodConfig(method), show_progress=False,
                                on_step=lambda s, t: steps.append(s), checkpoint=checkpoint)
    assert steps[0] == 7 and resumed.stats.steps == 10  # picked up after step 6
    assert all(torch.equal(unbroken[k], resumed.update[k]) for k in unbroken)
    assert not checkpoint.path.exists()  # a finished round leaves no checkpoint behind


def test_a_checkpoint_of_another_round_is_ignored(trainer, tmp_path):
    local, start = trainer
    cfg, digest = lm.TrainConfig(epochs=1, lr=3e-3, batch_size=8), spec_digest(spec_of(start))
    with pytest.raises(Interrupted):
        local.train_round(start, digest, cfg, show_progress=False, checkpoint=Checkpointer(tmp_path, "round-0", every=1),
                          on_step=lambda s, t: (_ for _ in ()).throw(Interrupted()) if s == 2 else None)
    steps = []
    local.train_round(start, digest, cfg, show_progress=False, checkpoint=Checkpointer(tmp_path, "round-1", every=1),
                      on_step=lambda s, t: steps.append(s))
    assert steps[0] == 1


def test_gradient_accumulation_takes_fewer_larger_steps(trainer):
    local, start = trainer
    digest = spec_digest(spec_of(start))
    plain = local.train_round(start, digest, lm.TrainConfig(epochs=1, batch_size=4), show_progress=False)
    accumulated = local.train_round(start, digest, lm.TrainConfig(epochs=1, batch_size=4, grad_accum=2), show_progress=False)
    assert plain.stats.steps == 10 and accumulated.stats.steps == 5
    assert plain.stats.tokens == accumulated.stats.tokens  # the same data, half the optimizer steps


def test_adalora_reallocates_its_rank_budget_during_the_round(trainer):
    local, start = trainer
    cfg = lm.TrainConfig(epochs=2, lr=1e-2, batch_size=4)
    out = local.train_round(start, spec_digest(spec_of(start)), cfg, MethodConfig("adalora", r=4, target_r=1),
                            show_progress=False)
    singular = torch.cat([v.flatten() for k, v in out.update.items() if "lora_E" in k])
    assert out.heldout_after < out.heldout_before
    assert 0 < int((singular == 0).sum()) < singular.numel()  # the budget pruned some ranks, not all


def test_the_round_reports_its_token_weighted_mean_training_loss(trainer):
    local, start = trainer
    out = local.train_round(start, spec_digest(spec_of(start)), lm.TrainConfig(epochs=1, lr=1e-12, batch_size=4),
                            show_progress=False)  # a step too small to move the model: every batch sees the start
    assert out.stats.mean_loss == pytest.approx(lm.mean_token_loss(local.model, local.train_set, local.tokenizer.pad_token_id),
                                                rel=1e-4)
    assert out.stats.mean_loss != pytest.approx(out.stats.last_loss, rel=1e-4)  # not just the last micro-batch
