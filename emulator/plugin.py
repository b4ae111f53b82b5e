"""Plug a trained adapter back into the full model and export a standard Hugging Face folder.

Methods whose result is plain weights (full, LoRA, AdaLoRA and IA3 merged, BitFit) export a folder that
`AutoModelForCausalLM.from_pretrained` loads with no offsite code. Methods that add to the model keep
the base folder plain and put their part beside it: virtual tokens as a standard peft adapter in
`peft/` (`PeftModel.from_pretrained(model, folder / "peft")`), bottleneck adapters in
`bottleneck.safetensors`; `load_export` loads any of them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from offsite import precision
from offsite.emulator import bottleneck, methods
from offsite.emulator.build import load_base
from offsite.emulator.methods import MethodConfig
from offsite.emulator.plan import SplitPlan
from offsite.errors import ConfigError, IntegrityError

PEFT_DIR, BOTTLENECK_FILE = "peft", "bottleneck.safetensors"


def plug_in(base: str, plan: SplitPlan, adapter: dict[str, torch.Tensor], method: MethodConfig = MethodConfig()):
    """The full base model with the global `adapter` in effect (see `methods.apply`), and its tokenizer."""
    model, tokenizer = load_base(base)
    return methods.apply(model, plan, method, adapter, on_emulator=False), tokenizer


def shard_size(base: str) -> int | None:
    """The largest weights file of a sharded local base (so that its export is sharded like it), else None."""
    index = Path(base) / "model.safetensors.index.json"
    if not index.is_file():
        return None
    files = set(json.loads(index.read_text())["weight_map"].values())
    return max((Path(base) / f).stat().st_size for f in files)


def export(model, tokenizer, out_dir: str | Path, dtype: torch.dtype | None = None,
           max_shard_size: int | None = None) -> Path:
    """Save `model` (as `plug_in` returned it) as a standard folder, its method's extras beside it: every
    floating-point tensor in `dtype` (None: as the model holds it), in files of at most `max_shard_size`
    bytes (None: transformers' default). Tensors are cast one at a time: no second copy of the model."""
    from peft import PeftModel
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    state = base.state_dict()
    extras = {k: v.detach().contiguous() for k, v in state.items() if bottleneck.is_bottleneck(k)}
    weights = {k: v for k, v in state.items() if k not in extras}
    if dtype is not None:
        if dtype != precision.stored_dtype(base) and any(v.device.type == "meta" for v in weights.values()):
            raise ConfigError(f"an export in {precision.dtype_name(dtype)} needs the base in memory: part of it is "
                              "offloaded to disk, where it stays as stored; export in the base's dtype instead")
        weights, extras = precision.stored_state(weights, dtype), precision.stored_state(extras, dtype)
        base.config.dtype = dtype
    base.save_pretrained(str(out_dir), safe_serialization=True, state_dict=weights,
                         **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if isinstance(model, PeftModel):
        model.save_pretrained(str(out_dir / PEFT_DIR), safe_serialization=True)
    if extras:
        dim = next(v.shape[0] for k, v in extras.items() if k.endswith("down.weight"))
        blocks = sorted({int(k.split(f".{bottleneck.NAME}.")[0].rsplit(".", 1)[1]) for k in extras})
        save_file(extras, str(out_dir / BOTTLENECK_FILE), metadata={"bottleneck_dim": str(dim), "blocks": json.dumps(blocks)})
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def load_export(folder: str | Path):
    """Load an exported folder with whatever its method added: the model to run, and its tokenizer."""
    folder = Path(folder)
    model = precision.prepare(AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto"))
    if (folder / BOTTLENECK_FILE).is_file():
        from safetensors import safe_open
        with safe_open(str(folder / BOTTLENECK_FILE), "pt") as f:
            meta = f.metadata()
        blocks = tuple(json.loads(meta["blocks"]))
        bottleneck.install_at(model, blocks, int(meta["bottleneck_dim"]))
        missing = model.load_state_dict(load_file(str(folder / BOTTLENECK_FILE)), strict=False)
        if missing.unexpected_keys:
            raise IntegrityError(f"{folder / BOTTLENECK_FILE} has tensors the model lacks: {missing.unexpected_keys[:3]}")
    if (folder / PEFT_DIR).is_dir():
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(folder / PEFT_DIR))
    return model.eval(), AutoTokenizer.from_pretrained(str(folder))
