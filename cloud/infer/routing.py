"""Run one batch through many jobs' versions of the same base model.

Jobs on one base differ only in their adapter blocks (the bottom and top k). Every block of the base is
wrapped in a `RoutedBlock`: when all rows of the batch use the same version of that block (always so in
the shared middle), it is one call on the whole batch; otherwise each version runs on its own rows, with
the per-row arguments (hidden states, mask, positions, rotary tables) cut to those rows and the KV cache
seen through a `_RowsView` that reads and appends only those rows. The model's own forward, masks and
cache classes stay Hugging Face's, so every family that runs with a `DynamicCache` is served.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from offsite.emulator.blocks import find_blocks

# The block arguments that carry one entry per row of the batch; everything else is shared by all rows.
PER_ROW = frozenset({"hidden_states", "attention_mask", "position_ids", "position_embeddings", "alibi"})
CACHE_ARGS = frozenset({"cache", "past_key_values", "past_key_value", "layer_past"})


@dataclass(frozen=True)
class Group:
    """Rows of the batch that run through one version of a block."""
    module: nn.Module
    rows: torch.Tensor | None   # None: every row


class Router:
    """Which version of each block every row of the current batch uses; set by the engine between steps."""

    def __init__(self, model: nn.Module):
        found = find_blocks(model)
        self.path = found.path
        self.base_blocks: list[nn.Module] = list(found.blocks)
        self._groups: dict[int, list[Group]] = {}
        for index, block in enumerate(self.base_blocks):
            found.blocks[index] = RoutedBlock(block, index, self)

    def route(self, rows: list[dict[int, nn.Module]]) -> None:
        """`rows[r]` maps block index -> the module row r runs there (missing: the base's block)."""
        groups: dict[int, list[Group]] = {}
        for index, base in enumerate(self.base_blocks):
            members: dict[int, tuple[nn.Module, list[int]]] = {}
            for r, own in enumerate(rows):
                module = own.get(index, base)
                members.setdefault(id(module), (module, []))[1].append(r)
            if len(members) > 1:
                device = next(base.parameters()).device
                groups[index] = [Group(m, torch.tensor(rs, device=device)) for m, rs in members.values()]
            else:
                module = next(iter(members.values()))[0] if members else base
                groups[index] = [Group(module, None)]
        self._groups = groups

    def groups(self, index: int) -> list[Group]:
        return self._groups.get(index) or [Group(self.base_blocks[index], None)]


class RoutedBlock(nn.Module):
    """A base block that hands each row to the version of the block the router says; attributes the
    model reads from its layers (`attention_type`, `layer_idx`...) are the base block's."""

    def __init__(self, base: nn.Module, index: int, router: Router):
        super().__init__()
        self.base = base
        self.index = index
        object.__setattr__(self, "_router", router)   # not a submodule: the router holds the blocks
        object.__setattr__(self, "_signature", inspect.signature(base.forward))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)

    def forward(self, *args, **kwargs):
        groups = self._router.groups(self.index)
        if len(groups) == 1:
            return groups[0].module(*args, **kwargs)
        bound = self._signature.bind(*args, **kwargs)
        named = dict(bound.arguments)
        extra = {}
        for name, param in self._signature.parameters.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                extra = named.pop(name, {})
        named.update(extra)
        batch = named["hidden_states"].shape[0] if "hidden_states" in named else args[0].shape[0]
        if "hidden_states" not in named:
            named["hidden_states"] = args[0]
        cache_name = next((n for n in CACHE_ARGS if named.get(n) is not None), None)
        pending: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
        outputs = []
        for group in groups:
            call = {name: (_rows(value, group.rows, batch) if name in PER_ROW else value) for name, value in named.items()}
            if cache_name:
                call[cache_name] = _RowsView(named[cache_name], group.rows, pending)
            outputs.append(group.module(**call))
        if cache_name and pending:
            _append(named[cache_name], pending, batch)
        return _gather(outputs, groups, batch)


def _rows(value, rows: torch.Tensor, batch: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, rows)
    if isinstance(value, tuple):
        return tuple(_rows(v, rows, batch) for v in value)
    return value


def _gather(outputs: list, groups: list[Group], batch: int):
    first = outputs[0][0] if isinstance(outputs[0], tuple) else outputs[0]
    out = first.new_empty((batch, *first.shape[1:]))
    for group, output in zip(groups, outputs):
        out.index_copy_(0, group.rows, output[0] if isinstance(output, tuple) else output)
    if isinstance(outputs[0], tuple):
        return (out,) + tuple(None for _ in outputs[0][1:])
    return out


class _RowsView:
    """The batch's KV cache as one group of rows sees it: `update` returns those rows' past keys and
    values with the new ones appended, and leaves the append to the whole batch for afterwards (`_append`),
    once every group has computed its rows."""

    def __init__(self, cache, rows: torch.Tensor, pending: list):
        self._cache, self._rows, self._pending = cache, rows, pending

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self._pending.append((self._rows, layer_idx, key_states, value_states))
        layers = self._cache.layers
        if layer_idx >= len(layers) or not layers[layer_idx].is_initialized or layers[layer_idx].keys.numel() == 0:
            return key_states, value_states
        layer = layers[layer_idx]
        return (torch.cat([layer.keys.index_select(0, self._rows), key_states], dim=-2),
                torch.cat([layer.values.index_select(0, self._rows), value_states], dim=-2))

    def __getattr__(self, name: str):
        return getattr(self._cache, name)


def _append(cache, pending: list, batch: int) -> None:
    by_layer: dict[int, list] = {}
    for rows, layer_idx, k, v in pending:
        by_layer.setdefault(layer_idx, []).append((rows, k, v))
    for layer_idx, parts in by_layer.items():
        k0, v0 = parts[0][1], parts[0][2]
        keys, values = k0.new_empty((batch, *k0.shape[1:])), v0.new_empty((batch, *v0.shape[1:]))
        for rows, k, v in parts:
            keys.index_copy_(0, rows, k)
            values.index_copy_(0, rows, v)
        cache.update(keys, values, layer_idx)

