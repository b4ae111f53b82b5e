"""Bottleneck adapters (Houlsby et al., 2019) in the adapter blocks: no maintained library offers them
for the transformers and peft versions this project runs on, so they are written here.

Each adapter block gets two: one on its attention output and one on its feed-forward output, each
`x + up(gelu(down(x)))` with `up` starting at zero, so a fresh adapter leaves the model unchanged. They
are ordinary submodules of the block (`<block>.bottleneck.attn` and `.ffn`), so their tensors carry
the block's canonical names and travel, load and average like any other adapter tensor. (BLOOM's
attention and MLP add the residual themselves; there the adapter sees the sum, which still starts as
the identity.)
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from offsite.emulator.blocks import attention_module, feedforward_module, find_blocks
from offsite.emulator.plan import SplitPlan

NAME = "bottleneck"


class Bottleneck(nn.Module):
    def __init__(self, width: int, dim: int):
        super().__init__()
        self.down, self.up = nn.Linear(width, dim), nn.Linear(dim, width)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.gelu(self.down(x)))


def _adapt_output(adapter: Bottleneck):
    def hook(module, args, output):
        if isinstance(output, tuple):  # attention returns (output, weights, ...)
            return (adapter(output[0]),) + output[1:]
        return adapter(output)
    return hook


def fresh(width: int, dim: int) -> nn.ModuleDict:
    return nn.ModuleDict({"attn": Bottleneck(width, dim), "ffn": Bottleneck(width, dim)})


def install(model: nn.Module, plan: SplitPlan, dim: int, on_emulator: bool) -> None:
    """Add the two bottlenecks to every adapter block of `model` (once)."""
    install_at(model, [plan.emulator_index(b) if on_emulator else b for b in plan.adapter_blocks], dim)


def install_at(model: nn.Module, indices, dim: int) -> None:
    """Add the two bottlenecks to the blocks at `indices` (once)."""
    found = find_blocks(model)
    for index in indices:
        install_in_block(found.blocks[index], model.config.hidden_size, dim)


def install_in_block(block: nn.Module, width: int, dim: int) -> None:
    """Add the two bottlenecks to one block (once), on the block's device, in fp32 (they are small, and
    the residual stream they add to is fp32: offsite.precision)."""
    if hasattr(block, NAME):
        return
    anchor = next(p for p in block.parameters() if p.is_floating_point())
    pair = fresh(width, dim).to(anchor.device)
    block.add_module(NAME, pair)
    attention_module(block).register_forward_hook(_adapt_output(pair["attn"]))
    feedforward_module(block).register_forward_hook(_adapt_output(pair["ffn"]))


def fresh_state(model: nn.Module, plan: SplitPlan, dim: int) -> dict[str, torch.Tensor]:
    """Freshly initialised bottleneck tensors for every adapter block, under canonical names."""
    path, width = find_blocks(model).path, model.config.hidden_size
    return {f"{path}.{original}.{NAME}.{name}": t.detach().clone()
            for original in plan.adapter_blocks for name, t in fresh(width, dim).state_dict().items()}


def is_bottleneck(name: str) -> bool:
    return f".{NAME}." in name
