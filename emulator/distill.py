"""Distill the emulator's kept middle blocks to imitate the full middle (Offsite-Tuning, sec. 3.3).

Student = the layer-dropped middle, teacher = the full middle, adapter blocks and embeddings frozen.
loss = LM loss of the emulator + nmse_weight * NMSE(teacher middle output, student middle output),
NMSE = mean(((T - S) / rms(T))^2) over real tokens, rms taken per token over the hidden size.
Checkpoints (safetensors + JSON, never pickle) make a long run resumable. Under `accelerate launch` it
runs data-parallel: each process takes its share of every batch and DDP averages the gradients.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from offsite import lm, precision
from offsite.emulator.blocks import find_blocks
from offsite.emulator.plan import SplitPlan
from offsite.errors import ConfigError
from offsite.files import atomic_write, write_json
from offsite.tensors import to_bytes


@dataclass(frozen=True)
class DistillConfig:
    steps: int
    lr: float = 1e-4
    batch_size: int = 8
    seq_len: int = 128
    nmse_weight: float = 30.0
    checkpoint_every: int = 50
    seed: int = 0
    bf16: bool = False

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2 or self.checkpoint_every < 1:
            raise ConfigError(f"distillation steps, batch_size, seq_len and checkpoint_every must be positive: {self}")
        if self.lr <= 0 or self.nmse_weight < 0:
            raise ConfigError(f"distillation lr must be positive and nmse_weight non-negative: {self}")


@dataclass(frozen=True)
class DistillStats:
    steps: int
    resumed_from: int
    first_loss: float
    last_loss: float
    last_nmse: float
    processes: int = 1


def nmse(teacher: torch.Tensor, student: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean(((T - S) / rms(T))^2) over the positions where mask is 1."""
    rms = teacher.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
    err = ((teacher - student) / rms).pow(2).mean(-1)
    return (err * mask).sum() / mask.sum().clamp_min(1)


def _middle_output(hidden_states: tuple[torch.Tensor, ...], plan: SplitPlan, n_blocks: int) -> torch.Tensor:
    """hidden_states[i] is the input of block i; the middle ends where the top adapter starts."""
    return hidden_states[n_blocks - plan.top]


@lru_cache(maxsize=2)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed + epoch).shuffle(order)
    return tuple(order)


def _batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Which windows batch `step` uses: a pure function of the step, so a resumed run sees the same data."""
    return [_epoch_order(n, seed, pos // n)[pos % n] for pos in range(step * batch_size, (step + 1) * batch_size)]


def _share(indices: list[int], process_index: int, num_processes: int) -> list[int]:
    """This process's contiguous block of a batch. Packed windows all have the same length, so every share
    has as many tokens and the mean of the processes' mean losses (what DDP's averaged gradients follow)
    is the whole batch's mean loss: N processes take the steps one process takes."""
    size = len(indices) // num_processes
    return indices[process_index * size : (process_index + 1) * size]


class _OneProcess:
    """What distill() uses of an `accelerate.Accelerator`, for a plain run: the single-process CPU path
    as it was before accelerate, so its results stay the same bit for bit."""

    device = torch.device("cpu")
    process_index, num_processes, is_main_process = 0, 1, True

    @staticmethod
    def prepare(model):
        return model

    @staticmethod
    def backward(loss: torch.Tensor) -> None:
        loss.backward()

    @staticmethod
    def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    @staticmethod
    def reduce(tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        return tensor

    @staticmethod
    def wait_for_everyone() -> None:
        pass


def _accelerator(batch_size: int):
    """An Accelerator when launched on several processes (whose number must divide the batch), else _OneProcess."""
    if lm.launched_state() is None:
        return _OneProcess()
    from accelerate import Accelerator

    accelerator = Accelerator()
    if batch_size % accelerator.num_processes:
        raise ConfigError(f"distillation batch_size {batch_size} must be divisible by the {accelerator.num_processes} processes")
    return accelerator


def _checkpoint_paths(folder: Path) -> tuple[Path, Path, Path]:
    return folder / "student.safetensors", folder / "optimizer.safetensors", folder / "progress.json"


def _save_checkpoint(folder: Path, student: dict[str, torch.nn.Parameter], opt: torch.optim.AdamW, step: int,
                     cfg: DistillConfig) -> None:
    weights, opt_path, progress = _checkpoint_paths(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, p in student.items():
        s = opt.state.get(p, {})
        if s:
            state[f"{name}.exp_avg"], state[f"{name}.exp_avg_sq"] = s["exp_avg"], s["exp_avg_sq"]
    atomic_write(weights, to_bytes(student))
    atomic_write(opt_path, to_bytes(state))
    write_json(progress, {"step": step, "config": asdict(cfg)})  # written last: it commits the checkpoint


RUN_FREE = {"bf16", "checkpoint_every"}  # how a run computes, not what it trains: a resume may change them (bf16 is
                                        # chosen by a timing probe on CPUs, so it can differ between two runs)


def _run_of(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RUN_FREE}


def _load_checkpoint(folder: Path, student: dict[str, torch.nn.Parameter], opt: torch.optim.AdamW, cfg: DistillConfig) -> int:
    weights, opt_path, progress = _checkpoint_paths(folder)
    if not progress.is_file():
        return 0
    meta = json.loads(progress.read_text())
    if _run_of(meta["config"]) != _run_of(asdict(cfg)):
        raise ConfigError(f"{folder} holds a checkpoint of a different distillation run; remove it or use another folder")
    saved, opt_state = load_file(str(weights)), load_file(str(opt_path))
    with torch.no_grad():
        for name, p in student.items():
            p.copy_(saved[name])
            if f"{name}.exp_avg" in opt_state:
                opt.state[p] = {"step": torch.tensor(float(meta["step"])), "exp_avg": opt_state[f"{name}.exp_avg"].to(p.device),
                                "exp_avg_sq": opt_state[f"{name}.exp_avg_sq"].to(p.device)}
    return int(meta["step"])


def distill(teacher, student_model, plan: SplitPlan, windows: list[list[int]], pad_id: int, cfg: DistillConfig,
            checkpoint_dir: Path | None = None, show_progress: bool = True) -> DistillStats:
    """Train `student_model`'s kept middle blocks in place; `teacher` is the full model (frozen).

    Under `accelerate launch` both models move to the process's device, only the main process writes
    checkpoints and shows progress, and the returned losses are the means over all processes.
    """
    if not windows:
        raise ConfigError("distillation needs at least one window of text")
    accelerator = _accelerator(cfg.batch_size)
    n_full, n_emu = plan.num_blocks, len(plan.emulator_order)
    blocks = find_blocks(student_model)
    middle = range(plan.bottom, plan.bottom + len(plan.kept_middle))
    for p in list(teacher.parameters()) + list(student_model.parameters()):
        p.requires_grad_(False)
    student = {f"{blocks.path}.{i}.{name}": p for i in middle for name, p in blocks.blocks[i].named_parameters()}
    for p in student.values():
        p.requires_grad_(True)
    precision.master_weights(list(student.values()))  # a bf16 base's kept middle trains in fp32, saved back in bf16
    device = accelerator.device
    teacher.to(device)
    model = accelerator.prepare(student_model)  # DDP: averages the gradients of the kept middle over processes
    opt = torch.optim.AdamW(list(student.values()), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    start = _load_checkpoint(checkpoint_dir, student, opt, cfg) if checkpoint_dir else 0
    teacher.eval()
    model.train()
    first = last = last_nmse = float("nan")
    bar = tqdm(total=cfg.steps, initial=start, desc="distill emulator", mininterval=2.0,
               disable=not (show_progress and accelerator.is_main_process))
    for step in range(start, cfg.steps):
        mine = _share(_batch_indices(step, cfg.batch_size, len(windows), cfg.seed), accelerator.process_index,
                      accelerator.num_processes)
        ids, mask, labels = (t.to(device) for t in next(lm.batches([windows[i] for i in mine], len(mine), pad_id)))
        lr_scale = 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for group in opt.param_groups:
            group["lr"] = cfg.lr * lr_scale
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            with torch.no_grad():
                target = _middle_output(teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states, plan, n_full)
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            loss_sum, n = lm.next_token_loss_sum(out.logits, labels)
            lm_loss = loss_sum / max(n, 1)
            match = nmse(target.float(), _middle_output(out.hidden_states, plan, n_emu).float(), mask.float())
            loss = lm_loss + cfg.nmse_weight * match
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(list(student.values()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last, last_nmse = accelerator.reduce(torch.stack([loss.detach(), match.detach()]), "mean").tolist()
        first = last if step == start else first
        bar.set_postfix(loss=f"{last:.3f}", nmse=f"{last_nmse:.4f}", refresh=False)
        bar.update(1)
        if checkpoint_dir and accelerator.is_main_process and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
            _save_checkpoint(checkpoint_dir, student, opt, step + 1, cfg)  # every process holds the same weights
    bar.close()
    accelerator.wait_for_everyone()  # the last checkpoint is written before any process goes on
    for p in student_model.parameters():
        p.requires_grad_(False)
    student_model.eval()
    return DistillStats(steps=cfg.steps, resumed_from=start, first_loss=first, last_loss=last, last_nmse=last_nmse,
                        processes=accelerator.num_processes)
