"""Local training is repeatable, resumes from its checkpoint exactly, and accumulates gradients."""
import time

import pytest
import torch

from offsite import lm
from offsite.checkpoint import Checkpointer
from offsite.client.train import LocalTrainer
from offsite.emulator.build import build
from offsite.emulator.bundle import load_bundle
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


def test_slow_steps_are_checkpointed_by_time(trainer, tmp_path):
    """A round of fewer steps than --checkpoint-every still checkpoints when its steps are slow."""
    local, start = trainer
    cfg, digest = lm.TrainConfig(epochs=1, lr=3e-3, batch_size=8, seed=5), spec_digest(spec_of(start))
    checkpoint = Checkpointer(tmp_path, key="round-0", every=1000, every_s=0.05)

    def slow_then_die(step, total):
        time.sleep(0.06)  # each step takes longer than every_s
        if step == 4:
            raise Interrupted()

    with pytest.raises(Interrupted):
        local.train_round(start, digest, cfg, show_progress=False, on_step=slow_then_die, checkpoint=checkpoint)
    steps = []
    local.train_round(start, digest, cfg, show_progress=False, on_step=lambda s, t: steps.append(s), checkpoint=checkpoint)
    assert steps[0] == 5  # the checkpoint after step 4 was written by time, not by step count
    fast = Checkpointer(tmp_path, key="k", every=1000, every_s=3600)
    assert not fast.due(1) and fast.due(1000)


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


@pytest.mark.parametrize("schedule, warmup, total, expected", [
    ((0.0, 1.0), 2, 6, [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + 0.7071067811865476), 0.55, 0.1 + 0.45 * (1 - 0.7071067811865476)]),
    ((0.5, 1.0), 2, 4, [0.55, 0.1 + 0.45 * (1 - 0.3826834323650898), 0.1 + 0.45 * (1 - 0.7071067811865476),
                        0.1 + 0.45 * (1 - 0.9238795325112867)]),  # no warmup: it was in the job's first round
    ((0.0, 0.5), 1, 3, [1.0, 1.0, 0.1 + 0.45 * (1 + 0.7071067811865476)]),  # round 1 of 2: warmup, half the decay
])
def test_the_learning_rate_follows_its_part_of_the_schedule(schedule, warmup, total, expected):
    cfg = lm.TrainConfig(schedule=schedule, warmup_steps=warmup)
    assert [lm.lr_multiplier(step, total, cfg) for step in range(total)] == pytest.approx(expected, abs=1e-12)


def test_a_job_wide_schedule_is_one_decay_over_its_rounds():
    """Round r of R covers (r / R, (r + 1) / R): each round starts where the last one would have gone on."""
    rounds, steps = 4, 5
    parts = [lm.TrainConfig(schedule=(r / rounds, (r + 1) / rounds), warmup_steps=0) for r in range(rounds)]
    chained = [lm.lr_multiplier(s, steps, cfg) for cfg in parts for s in range(steps)]
    whole = [lm.lr_multiplier(s, rounds * steps, lm.TrainConfig(warmup_steps=0)) for s in range(rounds * steps)]
    assert chained == pytest.approx(whole, abs=1e-12)
    assert chained[0] == 1.0 and chained[-1] < 0.12  # one decay, not four restarts
    for bad in ((0.5, 0.5), (-0.1, 0.5), (0.2, 1.5)):
        with pytest.raises(ValueError, match="schedule"):
            lm.TrainConfig(schedule=bad)


def test_the_proximal_term_and_its_gradient_by_hand():
    w = torch.nn.Parameter(torch.tensor([2.0, 4.0]))
    v = torch.nn.Parameter(torch.tensor([[1.0]]))
    term = lm.proximal_term([w, v], [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])], mu=0.5)
    assert term.item() == pytest.approx(0.25 * (1 + 4 + 4))  # mu / 2 * ||w - w0||^2
    term.backward()
    assert w.grad.tolist() == [0.5, 1.0] and v.grad.tolist() == [[-1.0]]  # mu * (w - w0)
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="prox_mu"):
            lm.TrainConfig(prox_mu=bad)


def test_fedprox_keeps_the_local_update_near_the_global_adapter(trainer):
    local, start = trainer
    digest = spec_digest(spec_of(start))

    def moved(mu: float) -> float:
        out = local.train_round(start, digest, lm.TrainConfig(epochs=1, lr=1e-2, batch_size=8, prox_mu=mu), MethodConfig(),
                                show_progress=False)
        return sum(float(((out.update[k].double() - start[k].double()) ** 2).sum()) for k in start) ** 0.5

    free, held = moved(0.0), moved(50.0)
    assert held < 0.2 * free  # the proximal term pulls the local steps back toward the start (measured: 1.91 vs 0.09)


def test_the_final_norm_and_embeddings_train_and_travel_when_the_job_says_so(tiny_model, client_data, tmp_path):
    result = build(str(tiny_model), EmulatorConfig(emulator_layers=1, train_extra=("norm", "embeddings")), tmp_path / "b",
                   show_progress=False)
    texts = read_texts(client_data[0] / "train.jsonl")
    local = LocalTrainer(tmp_path / "b", texts, texts[:8], max_length=64)
    start = result.skeleton
    out = local.train_round(start, spec_digest(spec_of(start)), lm.TrainConfig(epochs=1, lr=1e-2, batch_size=8),
                            show_progress=False)
    assert set(out.update) == set(start)  # the blocks and the extras
    for name in ("model.norm.weight", "model.embed_tokens.weight"):
        assert not torch.equal(out.update[name], start[name])
    assert out.heldout_after < out.heldout_before


def test_through_lora_the_head_and_embeddings_train_as_factors_and_the_norm_in_full(tiny_model, client_data, tmp_path):
    """The demo base ties its head to its embeddings: one LoRA on the shared matrix, which the merge changes once."""
    from offsite.emulator import methods
    result = build(str(tiny_model), EmulatorConfig(emulator_layers=1, train_extra=("norm", "head")), tmp_path / "b",
                   show_progress=False)
    texts = read_texts(client_data[0] / "train.jsonl")
    local = LocalTrainer(tmp_path / "b", texts, texts[:8], max_length=64)
    start, cfg = result.skeleton, MethodConfig("lora", r=4)
    out = local.train_round(start, spec_digest(spec_of(start)), lm.TrainConfig(epochs=1, lr=1e-2, batch_size=8), cfg,
                            show_progress=False)
    outer = {k for k in out.update if ".layers." not in k}
    assert outer == {"model.embed_tokens.lora_embedding_A", "model.embed_tokens.lora_embedding_B", "model.norm.weight"}
    assert out.heldout_after < out.heldout_before
    scratch, _, _ = load_bundle(tmp_path / "b")
    proposal = methods.propose(scratch, local.plan, cfg, start, out.update)
    for name in ("model.norm.weight", "model.embed_tokens.weight"):
        assert not torch.equal(proposal[name], start[name])
    table = start["model.embed_tokens.weight"].numel()
    assert out.update["model.embed_tokens.lora_embedding_A"].numel() + out.update["model.embed_tokens.lora_embedding_B"].numel() < table / 4


def test_a_round_checkpoint_is_keyed_by_what_trains_not_how():
    """A restart whose timing probe chose bf16 differently resumes the checkpoint; other settings do not."""
    import dataclasses
    from types import SimpleNamespace

    from offsite.client.run import checkpoint_key
    task = SimpleNamespace(job_id="j", round=1, adapter_sha256="a" * 64, emulator_patch_sha256="")
    cfg = lm.TrainConfig(epochs=1, lr=1e-3, batch_size=8)
    key = checkpoint_key(task, "lora", cfg, "d")
    assert key == checkpoint_key(task, "lora", dataclasses.replace(cfg, bf16=True), "d")
    assert key != checkpoint_key(task, "lora", dataclasses.replace(cfg, lr=2e-3), "d")
    assert key != checkpoint_key(SimpleNamespace(**{**vars(task), "round": 2}), "lora", cfg, "d")
    assert key != checkpoint_key(task, "lora", cfg, "other data")
