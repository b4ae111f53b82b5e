"""Tensors on the wire and on disk: safetensors bytes only (never pickle), and strict checks."""
from __future__ import annotations

import hashlib
import json

import torch
from pathlib import Path

from safetensors.torch import load, load_file, save

from offsite.errors import InvalidUpdateError

TensorSpec = dict[str, tuple[list[int], str]]


def to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    try:
        return load(data)
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise InvalidUpdateError(f"not a valid safetensors payload: {e}") from e


def load_blob(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file we stored ourselves, read straight from disk (no bytes copy)."""
    return load_file(str(path))


def spec_of(tensors: dict[str, torch.Tensor]) -> TensorSpec:
    return {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sorted(tensors.items())}


def spec_digest(spec: TensorSpec) -> str:
    """A stable hash of names, shapes and dtypes: binds an update to the skeleton it was trained from."""
    canonical = json.dumps({k: [list(s), d] for k, (s, d) in sorted(spec.items())}, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_matches(tensors: dict[str, torch.Tensor], spec: TensorSpec) -> None:
    """Raise InvalidUpdateError unless `tensors` has exactly the spec's names, shapes and dtypes, all finite."""
    missing = sorted(set(spec) - set(tensors))
    extra = sorted(set(tensors) - set(spec))
    if missing or extra:
        raise InvalidUpdateError(f"tensor names differ from the skeleton: missing {missing[:5]}, extra {extra[:5]}")
    for name, (shape, dtype) in spec.items():
        t = tensors[name]
        if list(t.shape) != list(shape):
            raise InvalidUpdateError(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
        if str(t.dtype).removeprefix("torch.") != dtype:
            raise InvalidUpdateError(f"tensor {name} has dtype {t.dtype}, expected {dtype}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise InvalidUpdateError(f"tensor {name} has non-finite values")


def l2_norm(tensors) -> float:
    """The L2 norm over every value of every tensor in `tensors` (an iterable), in float64."""
    return sum(float(v.double().pow(2).sum()) for v in tensors) ** 0.5


def clip(change: dict[str, torch.Tensor], bound: float) -> tuple[dict[str, torch.Tensor], float]:
    """`change` scaled down to L2 norm `bound` if it is longer; returns it and its norm before clipping."""
    norm = l2_norm(change.values())
    scale = min(1.0, bound / norm) if norm > 0 else 1.0
    return {k: v.double() * scale for k, v in change.items()}, norm
