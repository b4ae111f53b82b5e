"""The adapter's tensors under one canonical naming: the full model's state-dict names (blocks, and the
plan's extras outside them).

The same adapter block sits at different indices in the emulator and in the full model; naming its
tensors by the full model's indices lets the cloud plug an update in with a plain state-dict load.
"""
from __future__ import annotations

import torch
from torch import nn

from offsite.emulator.blocks import find_blocks
from offsite.emulator.plan import SplitPlan
from offsite.errors import InvalidUpdateError


def _block_tensors(model: nn.Module, plan: SplitPlan, on_emulator: bool) -> dict[str, torch.nn.Parameter]:
    """The adapter blocks' parameters and the plan's extras (named alike in the emulator and the full model)."""
    found = find_blocks(model)
    out = {}
    for original in plan.adapter_blocks:
        index = plan.emulator_index(original) if on_emulator else original
        for name, param in found.blocks[index].named_parameters():
            out[f"{found.path}.{original}.{name}"] = param
    if plan.extras:
        params = dict(model.named_parameters())
        missing = [n for n in plan.extras if n not in params]
        if missing:
            raise InvalidUpdateError(f"the model has no parameters {missing[:3]}, which the adapter trains")
        out.update({n: params[n] for n in plan.extras})
    return out


def adapter_parameters(model: nn.Module, plan: SplitPlan, on_emulator: bool) -> dict[str, torch.nn.Parameter]:
    """The live adapter parameters of `model`, keyed by canonical name (for training)."""
    return _block_tensors(model, plan, on_emulator)


def extract_adapter(model: nn.Module, plan: SplitPlan, on_emulator: bool,
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """A detached copy of the adapter's tensors, keyed by canonical name, in `dtype` (None: as they are)."""
    return {k: v.detach().to(dtype or v.dtype, copy=True) for k, v in _block_tensors(model, plan, on_emulator).items()}


@torch.no_grad()
def load_adapter(model: nn.Module, plan: SplitPlan, adapter: dict[str, torch.Tensor], on_emulator: bool,
                 share: bool = False) -> None:
    """Copy `adapter` into the model's adapter blocks; the names must match exactly. With `share`, a tensor
    of the parameter's dtype and device becomes the parameter's storage instead of being copied (no second
    copy of the adapter; the model may then change `adapter` in place: the caller must not need it)."""
    params = _block_tensors(model, plan, on_emulator)
    if set(params) != set(adapter):
        missing, extra = sorted(set(params) - set(adapter)), sorted(set(adapter) - set(params))
        raise InvalidUpdateError(f"adapter does not fit the model: missing {missing[:5]}, extra {extra[:5]}")
    for name, param in params.items():
        if param.shape != adapter[name].shape:
            raise InvalidUpdateError(f"adapter tensor {name} has shape {list(adapter[name].shape)}, model has {list(param.shape)}")
        value = adapter[name]
        if share and value.dtype == param.dtype and value.device == param.device:
            param.data = value
        else:
            param.copy_(value.to(param.dtype))


def freeze_all_but_adapter(model: nn.Module, plan: SplitPlan, on_emulator: bool) -> list[nn.Parameter]:
    """Freeze everything (embeddings, emulator middle, head) except the adapter (with the plan's extras);
    return the trainables."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = list(_block_tensors(model, plan, on_emulator).values())
    for p in trainable:
        p.requires_grad_(True)
    return trainable
