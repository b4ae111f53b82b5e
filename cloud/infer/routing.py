"""Run one batch through many jobs' versions of the same base model.

Jobs on one base differ in their adapter blocks (the bottom and top k) and, where a job trained them
(offsite.emulator.extras), in its final norm, input embeddings and head: each of these is wrapped in a
`RoutedOuter` that hands each row to its job's version, the same way. Every block of the base is
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
from offsite.emulator.extras import outer_modules

# The block arguments that carry one entry per row of the batch; everything else is shared by all rows.
PER_ROW = frozenset({"hidden_states", "attention_mask", "position_ids", "position_embeddings", "alibi"})
CACHE_ARGS = frozenset({"cache", "past_key_values", "past_key_value", "layer_past"})


@dataclass(frozen=True)
class Group:
    """Rows of the batch that run through one version of a block."""
    module: nn.Module
    rows: torch.Tensor | None   # None: every row


@dataclass(frozen=True)
class Delta:
    """A low-rank change to one linear layer of a base block: y += (x @ down) @ up, on some rows."""
    down: torch.Tensor   # (in, rank)
    up: torch.Tensor     # (rank, out)


class Router:
    """Which version of each block every row of the current batch uses, and which low-rank deltas its
    rows add inside the base's blocks; set by the engine between steps."""

    def __init__(self, model: nn.Module):
        found = find_blocks(model)
        self.path = found.path
        self.base_blocks: list[nn.Module] = list(found.blocks)
        named = {id(p): n for n, p in model.named_parameters()}  # a tied head's weight: the embedding's name
        self.outer: dict[str, Outer] = {name: Outer(name, m, {a: named[id(p)] for a, p in m.named_parameters(recurse=False)})
                                        for name, m in outer_modules(model).items()}
        self._outer_groups: dict[str, list[Group]] = {}
        for name, o in self.outer.items():
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, RoutedOuter(o.module, name, self))
        self._groups: dict[int, list[Group]] = {}
        self._deltas: dict[int, list[tuple[torch.Tensor, Delta]]] = {}   # id(linear) -> (rows in its call, delta)
        self._hooked: set[int] = set()
        for index, block in enumerate(self.base_blocks):
            found.blocks[index] = RoutedBlock(block, index, self)

    def route(self, rows: list[tuple[dict[int, nn.Module], dict[tuple[int, str], Delta], dict[str, nn.Module]]]) -> None:
        """`rows[r]` = (block index -> the module row r runs there, missing: the base's block;
        (block index, linear name) -> the delta row r adds to that linear of the base's block;
        outer module name -> row r's version of it, missing: the base's)."""
        groups: dict[int, list[Group]] = {}
        deltas: dict[int, list[tuple[torch.Tensor, Delta]]] = {}
        self._outer_groups = {name: _grouped([own.get(name, o.module) for _, _, own in rows], o.module)
                              for name, o in self.outer.items()}
        for index, base in enumerate(self.base_blocks):
            groups[index] = _grouped([own.get(index, base) for own, _, _ in rows], base)
            on_base = [r for r, (own, _, _) in enumerate(rows) if index not in own]  # the base block's rows, in its call's order
            device = next(base.parameters()).device
            by_delta: dict[int, tuple[str, Delta, list[int]]] = {}
            for position, r in enumerate(on_base):
                for (block, name), delta in rows[r][1].items():
                    if block == index:
                        by_delta.setdefault(id(delta), (name, delta, []))[2].append(position)
            for name, delta, positions in by_delta.values():
                linear = base.get_submodule(name)
                self._hook(linear)
                deltas.setdefault(id(linear), []).append((torch.tensor(positions, device=device), delta))
        self._groups, self._deltas = groups, deltas

    def groups(self, index: int) -> list[Group]:
        return self._groups.get(index) or [Group(self.base_blocks[index], None)]

    def outer_groups(self, name: str) -> list[Group]:
        return self._outer_groups.get(name) or [Group(self.outer[name].module, None)]

    def _hook(self, linear: nn.Module) -> None:
        if id(linear) not in self._hooked:
            router = self

            def add_deltas(module, args, output):  # a plain function: deepcopy of the block shares it, not the router
                return router._add_deltas(module, args, output)
            linear.register_forward_hook(add_deltas)
            self._hooked.add(id(linear))

    def _add_deltas(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Each job's low-rank change to this linear, on its own rows of the call (a copy of a hooked
        block made for a dense job is another module: it finds nothing here)."""
        for rows, delta in self._deltas.get(id(module), ()):
            x = args[0].index_select(0, rows)
            output.index_add_(0, rows, (x.to(delta.down.dtype) @ delta.down @ delta.up).to(output.dtype))
        return output


@dataclass(frozen=True)
class Outer:
    """A module outside the blocks that a job may have its own version of (final norm, embeddings, head)."""
    name: str
    module: nn.Module        # the base's
    params: dict[str, str]   # its own parameters' attribute names -> their names in the model (offsite.emulator.extras)


def _grouped(modules: list[nn.Module], base: nn.Module) -> list[Group]:
    """One group per distinct module over the rows (rows: None when every row runs the same one)."""
    members: dict[int, tuple[nn.Module, list[int]]] = {}
    for r, module in enumerate(modules):
        members.setdefault(id(module), (module, []))[1].append(r)
    if len(members) <= 1:
        return [Group(next(iter(members.values()))[0] if members else base, None)]
    device = next(base.parameters()).device
    return [Group(m, torch.tensor(rs, device=device)) for m, rs in members.values()]


class RoutedOuter(nn.Module):
    """A norm, embedding or head of the base that hands each row (the first dimension of its input) to the
    version of it the router says."""

    def __init__(self, base: nn.Module, name: str, router: Router):
        super().__init__()
        self.base = base
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_router", router)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["base"], name)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        groups = self._router.outer_groups(self._name)
        if len(groups) == 1:
            return groups[0].module(x, *args, **kwargs)
        return _gather([g.module(x.index_select(0, g.rows), *args, **kwargs) for g in groups], groups, x.shape[0])


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

