"""Emulator bundles: a standard Hugging Face model folder plus `offsite-manifest.json`.

The manifest lists the SHA-256 and size of every file; loading verifies all of them before any file
is parsed. Weights are safetensors only, so loading a bundle never executes code.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from offsite import precision
from offsite.emulator.plan import SplitPlan
from offsite.emulator.quantize import keep_differentiable
from offsite.emulator.sharing import share_blocks
from offsite.errors import IntegrityError
from offsite.files import sha256_file, write_json

MANIFEST = "offsite-manifest.json"
FORMAT = "offsite-emulator/1"


def write_manifest(folder: Path, plan: SplitPlan, block_path: str, provenance: dict) -> dict:
    files = {
        p.name: {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "format": FORMAT,
        "files": files,
        "plan": plan.to_dict(),
        "block_path": block_path,
        "emulator_order": list(plan.emulator_order),
        "adapter_blocks": list(plan.adapter_blocks),
        "provenance": provenance,
    }
    write_json(folder / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise IntegrityError(f"{path}: bundle manifest missing")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise IntegrityError(f"{path}: unknown bundle format {manifest.get('format')!r}")
    return manifest


def verify_bundle(folder: str | Path) -> dict:
    """Check every file against the manifest; raise IntegrityError naming the first bad file."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, meta in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise IntegrityError(f"bundle file {name} is missing from {folder}")
        if path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
            raise IntegrityError(f"bundle file {name} does not match its manifest hash")
    return manifest


def load_bundle(folder: str | Path, device: str = "cpu"):
    """Verify, then load the emulator model (onto `device`, in the dtype it is stored in, ready to run:
    offsite.precision.prepare), its tokenizer and plan."""
    manifest = verify_bundle(folder)
    placement = {} if device == "cpu" else {"device_map": {"": device}}  # bitsandbytes packs on the target device
    model = precision.prepare(AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto", **placement))
    keep_differentiable(model)
    plan = SplitPlan.from_dict(manifest["plan"])
    share_blocks(model, plan)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model, tokenizer, plan


def describe_bundle(folder: str | Path) -> tuple[object, SplitPlan, torch.dtype]:
    """Verify, then read the bundle's tokenizer, plan and stored dtype without loading its weights."""
    manifest = verify_bundle(folder)
    dtype = precision.config_dtype(AutoConfig.from_pretrained(str(folder))) or _header_dtype(Path(folder))
    return AutoTokenizer.from_pretrained(str(folder)), SplitPlan.from_dict(manifest["plan"]), dtype


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _header_dtype(folder: Path) -> torch.dtype:
    """For a config that names no dtype: the first floating-point tensor's, as a file header says
    (transformers' dtype="auto" does the same)."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                if (dtype := _SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())) is not None:
                    return dtype
    return torch.float32
