"""CRaSh's layer sharing (Zhang et al., EMNLP 2023): each kept middle block runs again in place of the
dropped blocks it stands for, so the emulator keeps the full model's depth with the weights of a few
blocks.

A forward hook re-runs the block on its own output; the block list, the weights and their names stay
as they are, so the bundle stays a standard model folder and only its plan (`SplitPlan.repeats`) says to
share. A KV cache would hold one entry per block, not per run: a shared emulator runs without one.
"""
from __future__ import annotations

from torch import nn

from offsite.emulator.blocks import find_blocks
from offsite.emulator.plan import SplitPlan
from offsite.errors import UnsupportedModelError


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _repeat_hook(times: int):
    def rerun(module: nn.Module, args: tuple, kwargs: dict, output):
        if kwargs.get("use_cache") and (kwargs.get("past_key_values") or kwargs.get("past_key_value")) is not None:
            raise UnsupportedModelError("a shared emulator block cannot fill a KV cache: run it with use_cache=False")
        for _ in range(times - 1):
            if args:
                args = (_hidden(output), *args[1:])
            elif "hidden_states" in kwargs:
                kwargs = {**kwargs, "hidden_states": _hidden(output)}
            else:
                raise UnsupportedModelError(f"{type(module).__name__} gets no hidden states to run again on")
            output = module.forward(*args, **kwargs)
        return output
    return rerun


def share_blocks(emulator: nn.Module, plan: SplitPlan) -> nn.Module:
    """Make each kept middle block of `emulator` (already cut to the plan) run `plan.repeats` times; a no-op
    for a plan without repeats. Turns the KV cache off, which generate() then honours."""
    if not plan.repeats or set(plan.repeats) == {1}:
        return emulator
    blocks = find_blocks(emulator).blocks
    for position, times in zip(range(plan.bottom, plan.bottom + len(plan.kept_middle)), plan.repeats):
        if times > 1:  # first among the block's hooks, so whatever records its output sees the last run's
            blocks[position].register_forward_hook(_repeat_hook(times), with_kwargs=True, prepend=True)
    emulator.config.use_cache = False
    if getattr(emulator, "generation_config", None) is not None:
        emulator.generation_config.use_cache = False
    return emulator
