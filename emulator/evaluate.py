"""Held-out evaluation: the same examples through several models, loss and perplexity side by side."""
from __future__ import annotations

import math
from pathlib import Path

from offsite import lm
from offsite.emulator.build import load_base
from offsite.emulator.bundle import load_bundle, read_manifest
from offsite.textdata import read_texts


def losses(models: dict, encoded: list[list[int]], pad_id: int) -> dict[str, float]:
    """Mean token loss of each named model on the same encoded examples."""
    return {name: round(lm.mean_token_loss(m, encoded, pad_id), 4) for name, m in models.items()}


def count_params(model) -> int:
    """Parameters as the model defines them; a packed 4-bit weight knows its real shape."""
    total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += math.prod(shape) if shape is not None else p.numel()
    return total


def compare_full_and_emulator(model: str, emulator_dir: str | Path, data: str | Path, max_length: int = 512) -> dict:
    """Loss, perplexity, parameters and bytes of the full model and of the emulator alone.
    Under `accelerate launch` each process scores its share of the examples on its own device."""
    state = lm.launched_state()
    device = "cpu" if state is None or state.device.type == "cpu" else str(state.device)
    full, tokenizer = load_base(model)
    emulator, _, plan = load_bundle(emulator_dir, device)
    encoded = lm.encode(tokenizer, read_texts(data), max_length)
    manifest = read_manifest(emulator_dir)
    out = {}
    for name, m in (("full", full.to(device)), ("emulator", emulator)):
        loss = lm.mean_token_loss(m, encoded, tokenizer.pad_token_id, state=state)
        out[name] = {"loss": round(loss, 4), "ppl": round(math.exp(loss), 3), "params": count_params(m),
                     "bytes": sum(p.numel() * p.element_size() for p in m.parameters())}
    out["emulator"]["bundle_bytes"] = sum(f["size"] for f in manifest["files"].values())
    out["plan"] = plan.to_dict()
    out["examples"] = len(encoded)
    return out
