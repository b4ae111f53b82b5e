"""Real quantization of the emulator's frozen middle with bitsandbytes (int8 or NF4), packed in the bundle.

The adapter blocks, embeddings and LM head stay in the base's dtype: the client trains the adapter on top
of the quantized middle (QLoRA-style). The result is a standard Hugging Face folder whose config carries
`quantization_config`, so `from_pretrained` loads the packed weights as they are.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from offsite.emulator.plan import SplitPlan
from offsite.errors import ConfigError

MODES = ("int8", "nf4")


def bnb_config(mode: str, keep_full_precision: list[str]) -> BitsAndBytesConfig:
    skip = [re.escape(name) for name in keep_full_precision] + ["lm_head"]
    if mode == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip)
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    raise ConfigError(f"quantize must be one of {MODES}, got {mode!r}")


def adapter_module_names(block_path: str, plan: SplitPlan) -> list[str]:
    """Emulator module names of the adapter blocks (these are never quantized)."""
    return [f"{block_path}.{plan.emulator_index(i)}" for i in plan.adapter_blocks]


def quantize_saved(folder: Path, tokenizer, plan: SplitPlan, block_path: str, mode: str, out_dir: Path) -> None:
    """Save the emulator saved unpacked in `folder` (in the base's dtype) to `out_dir` with its middle
    blocks quantized; what is not quantized keeps the base's dtype. bitsandbytes packs while it loads, so
    the caller saves the emulator and lets it go first: one copy of it in memory, not two."""
    config = bnb_config(mode, adapter_module_names(block_path, plan))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=config, dtype="auto")
    out_dir.mkdir(parents=True, exist_ok=True)
    quantized.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))


def keep_differentiable(model) -> None:
    """Turn off bitsandbytes' CPU repacking of 4-bit weights.

    On its first no-grad eval pass on an AVX512-BF16 CPU, Linear4bit repacks its weight for a faster
    kernel (rounding absmax to bf16) and keeps using that kernel, which has no backward, in training:
    gradients to the bottom adapter blocks would silently be wrong after any evaluation.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def tensor_bytes_by_block(weights_file: Path, block_path: str) -> dict[int, int]:
    """Bytes each block occupies in a safetensors file (read from the header; nothing is loaded)."""
    out: dict[int, int] = {}
    pattern = re.compile(rf"^{re.escape(block_path)}\.(\d+)\.")
    with safe_open(str(weights_file), framework="pt") as f:
        for name in f.keys():
            match = pattern.match(name)
            if match:
                sl = f.get_slice(name)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                out[int(match.group(1))] = out.get(int(match.group(1)), 0) + numel * _itemsize(sl.get_dtype())
    return out


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}[dtype]
