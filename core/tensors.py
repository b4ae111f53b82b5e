"""Tensors on the wire and on disk: safetensors bytes only (never pickle), and strict checks."""
from __future__ import annotations

import hashlib
import json
import math

import torch
from pathlib import Path

from safetensors.torch import load, load_file, save, save_file

from offsite.errors import InvalidUpdateError

TensorSpec = dict[str, tuple[list[int], str]]
# safetensors' dtype codes and item sizes, by torch dtype name
_DTYPES = {"float64": ("F64", 8), "float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2),
           "int64": ("I64", 8), "uint64": ("U64", 8), "int32": ("I32", 4), "uint32": ("U32", 4), "int16": ("I16", 2),
           "int8": ("I8", 1), "uint8": ("U8", 1), "bool": ("BOOL", 1)}
METADATA_SLACK = 1024  # room for a `__metadata__` entry that another safetensors writer may add


def to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    try:
        return load(data)
    except Exception as e:  # safetensors raises its own error types for malformed headers
        raise InvalidUpdateError(f"not a valid safetensors payload: {e}") from e


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Tensors as a safetensors file, written straight from the tensors (no bytes copy in memory)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_blob(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file we stored ourselves, read straight from disk (no bytes copy)."""
    return load_file(str(path))


def spec_of(tensors: dict[str, torch.Tensor]) -> TensorSpec:
    return {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in sorted(tensors.items())}


def spec_digest(spec: TensorSpec) -> str:
    """A stable hash of names, shapes and dtypes: binds an update to the skeleton it was trained from."""
    canonical = json.dumps({k: [list(s), d] for k, (s, d) in sorted(spec.items())}, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def payload_bounds(spec: TensorSpec) -> tuple[int, int]:
    """The fewest and most bytes a safetensors file holding exactly `spec` can have: the data is exact
    (elements x item size); the JSON header varies only in its offsets' digits, padding to 8 bytes and an
    optional metadata entry. Used to refuse, before any byte arrives, an upload no valid update fits."""
    data = sum(math.prod(shape) * _DTYPES[dtype][1] for shape, dtype in spec.values())
    most_digits = len(str(data))
    lo = hi = 2  # the braces
    for i, (name, (shape, dtype)) in enumerate(sorted(spec.items())):
        entry = len(f'{json.dumps(name)}:{{"dtype":"{_DTYPES[dtype][0]}","shape":[{",".join(map(str, shape))}],"data_offsets":[,]}}')
        lo += entry + 2 + (i > 0)
        hi += entry + 2 * most_digits + (i > 0)
    return 8 + lo + data, 8 + hi + 7 + METADATA_SLACK + data


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
