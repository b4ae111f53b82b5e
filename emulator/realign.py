"""FedBiOT's emulator re-alignment (Wu et al., KDD 2024): as the adapter moves away from the base, the
emulator built for the base's adapter drifts from what the full model does around the new one. Every few
rounds the model owner distills the emulator's kept middle again toward the full model's middle, with the
current global adapter plugged into both, on its own public text (the same loss as offsite.emulator.distill).

Only the kept middle changes, so clients receive it as a patch: every kept middle tensor, in the bundle's
dtype, as one safetensors blob through the verified blob transfer, a fraction of the bundle (no
embeddings, head, adapter blocks or tokenizer). A patch is whole, not relative to the last one: a client
that missed one needs only the newest, and applying it is a copy, so the client's emulator is the model
owner's bit for bit.
"""
from __future__ import annotations

import gc
from pathlib import Path

import torch
from torch import nn

from offsite import lm, precision, render
from offsite.emulator import methods
from offsite.emulator.blocks import find_blocks
from offsite.emulator.build import load_base
from offsite.emulator.bundle import load_bundle
from offsite.emulator.distill import DistillConfig, distill
from offsite.emulator.plan import SplitPlan
from offsite.errors import InvalidUpdateError


def middle_names(emulator: nn.Module, plan: SplitPlan) -> list[str]:
    """The state-dict names of the emulator's kept middle blocks' tensors: what a patch holds."""
    found = find_blocks(emulator)
    positions = range(plan.bottom, plan.bottom + len(plan.kept_middle))
    return [f"{found.path}.{i}.{name}" for i in positions for name, _ in found.blocks[i].named_parameters()]


def middle_state(emulator: nn.Module, plan: SplitPlan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The kept middle's tensors in `dtype` (the bundle's: distillation trains a half-precision middle in fp32)."""
    params = dict(emulator.named_parameters())
    return {name: params[name].detach().to(dtype, copy=True) for name in middle_names(emulator, plan)}


@torch.no_grad()
def apply_patch(emulator: nn.Module, plan: SplitPlan, patch: dict[str, torch.Tensor]) -> nn.Module:
    """Copy `patch` into the emulator's kept middle, after checking it holds exactly those tensors, each
    with the shape and dtype it replaces (a patch comes over the network)."""
    names, params = middle_names(emulator, plan), dict(emulator.named_parameters())
    if set(patch) != set(names):
        missing, extra = sorted(set(names) - set(patch)), sorted(set(patch) - set(names))
        raise InvalidUpdateError(f"emulator patch does not hold exactly the kept middle's tensors: missing {missing[:3]}, "
                                 f"unexpected {extra[:3]}")
    for name in names:
        have, new = params[name], patch[name]
        if new.shape != have.shape or new.dtype != have.dtype:
            raise InvalidUpdateError(f"emulator patch tensor {name} is {new.dtype} {list(new.shape)}, "
                                     f"the emulator's is {have.dtype} {list(have.shape)}")
    for name in names:
        params[name].copy_(patch[name])
    return emulator


def realign(full: nn.Module, emulator: nn.Module, plan: SplitPlan, method: methods.MethodConfig,
            adapter: dict[str, torch.Tensor], windows: list[list[int]], pad_id: int, cfg: DistillConfig,
            dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Distill the emulator's kept middle toward the full model's, both with `adapter` plugged in, in place;
    returns the patch (offsite.emulator.realign.middle_state). Methods with virtual tokens are refused by
    the job: their tokens change the sequence the middle's outputs are matched on."""
    teacher = methods.apply(full, plan, method, adapter, on_emulator=False)
    student = methods.apply(emulator, plan, method, adapter)
    distill(teacher, student, plan, windows, pad_id, cfg, show_progress=False)
    return middle_state(emulator, plan, dtype)


def realign_bundle(base: str, bundle_dir: str | Path, patch: dict[str, torch.Tensor] | None, method: methods.MethodConfig,
                   adapter: dict[str, torch.Tensor], texts: list[str], cfg: DistillConfig) -> dict[str, torch.Tensor]:
    """Load the emulator as clients hold it (the bundle with `patch`, if any) and the full model (`base`),
    re-align on `texts` around `adapter`; returns the new patch. Both models are let go before it returns."""
    emulator, tokenizer, plan = load_bundle(bundle_dir)
    if patch is not None:
        apply_patch(emulator, plan, patch)
    windows = lm.pack(lm.encode(tokenizer, texts, max_len=10**9), cfg.seq_len)
    full, _ = load_base(base)
    try:
        return realign(full, emulator, plan, method, adapter, windows, render.pad_id(tokenizer), cfg,
                       precision.stored_dtype(emulator))
    finally:
        del full, emulator
        gc.collect()  # a model's modules refer to each other: only the collector frees it
