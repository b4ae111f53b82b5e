"""Which adapter methods run on which model, decided by running them: the method attached to the emulator
and one forward of two tokens, as `jobs create` does before a job exists. Nothing here is a table kept
from memory: the README's list of what runs where is this module's output over every family's tiny
stand-in (`offsite emulator support --markdown`), and a test regenerates it against the locked releases.

The stand-ins are each family's real architecture from its transformers config, shrunk (width 32, six
blocks, a 96-token vocabulary) and randomly initialised: no download, a second per family.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from offsite.emulator import methods
from offsite.emulator.adapter import extract_adapter
from offsite.emulator.build import make_emulator
from offsite.emulator.plan import SplitPlan
from offsite.errors import ConfigError

V, H, L = 96, 32, 6
COMMON = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Every family the project is tested on, as its transformers config's own field names.
FAMILIES = {
    "gpt2": dict(n_embd=H, n_layer=L, n_head=4, n_positions=64),
    "opt": dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=H),
    "llama": dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    "mistral": dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    "qwen2": dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    "qwen3": dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, head_dim=8),
    "gemma2": dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, head_dim=8, sliding_window=16),
    "phi3": dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    "gpt_neox": dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, intermediate_size=64),
    "bloom": dict(hidden_size=H, n_layer=L, n_head=4),
    "falcon": dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4),
}


def tiny(family: str) -> PreTrainedModel:
    """The family's stand-in: its architecture at toy size, seeded weights, in eval mode."""
    config = AutoConfig.for_model(family, **COMMON, **FAMILIES[family])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


class MethodUnsupportedError(ConfigError):
    """The method's forward pass failed on this model; `cause` is what failed."""

    def __init__(self, method: str, model_type: str, cause: str):
        super().__init__(f"adapter method {method} does not run on model type {model_type!r}: {cause}")
        self.cause = cause


def probe(emulator: nn.Module, plan: SplitPlan, method: methods.MethodConfig,
          adapter: dict[str, torch.Tensor]) -> nn.Module:
    """`emulator` with the global `adapter` applied and the method attached, after one forward pass of two
    tokens. A method this model cannot run fails here, once, with a ConfigError naming the method and the
    model type, instead of on every client after enrollment."""
    attached, _ = methods.attach(methods.apply(emulator, plan, method, adapter, share=True), plan, method)
    try:
        with torch.no_grad():
            attached(input_ids=torch.ones(1, 2, dtype=torch.long))
    except Exception as e:
        raise MethodUnsupportedError(method.name, emulator.config.model_type, f"{type(e).__name__}: {e}") from None
    return attached


def check(model: PreTrainedModel, method: str) -> str | None:
    """None where `method` (its default settings) runs on `model`'s emulator, else the reason it does not.
    `model` is left as it is: the emulator is cut from a copy."""
    n = model.config.num_hidden_layers
    bottom = top = 2 if n >= 5 else 1
    plan = SplitPlan.uniform(n, bottom, top, 1)
    emulator = make_emulator(copy.deepcopy(model), plan)
    cfg = methods.MethodConfig(name=method)
    adapter = {**extract_adapter(emulator, plan, on_emulator=True), **methods.fresh_extras(emulator, plan, cfg)}
    try:
        probe(emulator, plan, cfg, adapter)
    except MethodUnsupportedError as e:
        return e.cause
    except ConfigError as e:  # refused before running: the method's settings do not fit the model
        return str(e)
    return None


def matrix(models: dict[str, PreTrainedModel]) -> dict[str, dict[str, str | None]]:
    """{name: {method: None (runs) or the reason it does not}} for every method."""
    return {name: {m: check(model, m) for m in methods.METHODS} for name, model in models.items()}


def markdown(table: dict[str, dict[str, str | None]]) -> str:
    """The matrix as a Markdown table (a row per model, a column per method), then the reasons."""
    lines = ["| model type | " + " | ".join(methods.METHODS) + " |", "|---" * (len(methods.METHODS) + 1) + "|"]
    reasons = []
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join("yes" if row[m] is None else "**no**" for m in methods.METHODS) + " |")
        reasons += [f"- {m} on {name}: {row[m]}" for m in methods.METHODS if row[m] is not None]
    return "\n".join(lines + ([""] + reasons if reasons else [])) + "\n"
