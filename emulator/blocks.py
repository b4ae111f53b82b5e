"""Find the transformer blocks of any Hugging Face decoder and cut them down in place.

Block lists are found structurally (the ModuleList whose length is the config's layer count), not
from a per-family table, so new architectures work without code changes.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from offsite.errors import UnsupportedModelError


@dataclass(frozen=True)
class BlockList:
    """Where a model keeps its blocks: the dotted module path and the list itself."""

    path: str
    blocks: nn.ModuleList


def num_blocks(config) -> int:
    return int(config.num_hidden_layers)


def find_blocks(model: nn.Module) -> BlockList:
    """Return the block list: the largest ModuleList whose length equals the config's layer count."""
    n = num_blocks(model.config)
    candidates = [
        (sum(p.numel() for p in module.parameters()), name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n and n > 0
    ]
    if not candidates:
        raise UnsupportedModelError(
            f"cannot find the transformer blocks of model type {model.config.model_type!r}: "
            f"no ModuleList of {n} blocks"
        )
    _, name, module = max(candidates, key=lambda c: c[0])
    return BlockList(path=name, blocks=module)


def keep_blocks(model: nn.Module, indices: list[int] | tuple[int, ...]) -> nn.Module:
    """Keep only `indices` (in that order), renumber attention caches and fix the config.

    Without renumbering `layer_idx`, `generate()` with a KV cache indexes past the cache; configs with
    per-layer lists (`layer_types`) must be sliced the same way.
    """
    found = find_blocks(model)
    kept = nn.ModuleList([found.blocks[i] for i in indices])
    parent_path, _, attr = found.path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, kept)
    for new_idx, block in enumerate(kept):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, (list, tuple)) and len(layer_types) == num_blocks(config):
        config.layer_types = [layer_types[i] for i in indices]
    config.num_hidden_layers = len(indices)
    return model


def attention_module(block: nn.Module) -> nn.Module:
    """The child named like attention that holds projection matrices (not e.g. `post_attention_layernorm`)."""
    candidates = [(sum(p.dim() == 2 for p in child.parameters()), child) for name, child in block.named_children()
                  if "attn" in name.lower() or "attention" in name.lower()]
    count, module = max(candidates, key=lambda c: c[0], default=(0, None))
    if not count:
        raise UnsupportedModelError(f"no attention submodule with projection weights in block {type(block).__name__}")
    return module


def feedforward_module(block: nn.Module) -> nn.Module:
    """The block's feed-forward part: the child named mlp / feed_forward / ffn, or (OPT keeps fc1 and fc2
    in the block itself) its last linear child, whose output is the feed-forward output."""
    children = dict(block.named_children())
    for name in ("mlp", "feed_forward", "ffn"):
        if name in children:
            return children[name]
    linears = [child for child in children.values() if isinstance(child, nn.Linear)]
    if not linears:
        raise UnsupportedModelError(f"no feed-forward submodule in block {type(block).__name__}")
    return linears[-1]
