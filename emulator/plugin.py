"""Plug a trained adapter back into the full model and export a plain Hugging Face folder."""
from __future__ import annotations

from pathlib import Path

import torch

from offsite.emulator.adapter import load_adapter
from offsite.emulator.build import load_base
from offsite.emulator.plan import SplitPlan


def plug_in(base: str, plan: SplitPlan, adapter: dict[str, torch.Tensor]):
    """The full base model with its adapter blocks replaced by `adapter`."""
    model, tokenizer = load_base(base)
    load_adapter(model, plan, adapter, on_emulator=False)
    return model, tokenizer


def export(model, tokenizer, out_dir: str | Path) -> Path:
    """Save as a standard folder that `AutoModelForCausalLM.from_pretrained` loads with no offsite code."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
