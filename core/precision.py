"""Models in the dtype they are stored in: bf16 or fp16 weights stay half precision in memory.

A real base is stored in bf16 (or fp16); upcasting it to fp32 doubles every role's memory. Instead the
frozen weights keep their stored dtype and are computed with in one of two ways, chosen by measurement
(`choose`):

- **bf16 autocast** where bf16 matmuls pay (CUDA with bf16, CPUs with AMX): matmuls run in bf16 on the
  stored weights as they are;
- **fp32 per layer** elsewhere: each frozen half-precision linear casts its weight to fp32 for the one
  call (`UpcastLinear`), and its backward casts it again rather than keeping the fp32 copy, so memory
  holds the stored weights plus one layer's fp32 copy at a time.

Either way the residual stream is fp32 (embeddings hand fp32 on), small frozen tensors (norms, biases)
are fp32, and whatever trains is fp32 (`master_weights`), as in mixed-precision training (QLoRA keeps
its LoRA weights in fp32 on a 4-bit base the same way). What is stored or sent is cast back to the
stored dtype once (`stored_state`).
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from offsite.errors import ConfigError
from offsite.memory import return_freed_memory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HALF = (torch.bfloat16, torch.float16)
LARGE = 1 << 22  # values in a weight whose fp32 cast (16 MiB) is worth pages of its own


def parse_dtype(name: str) -> torch.dtype:
    """A dtype from its name (`float32`, `bfloat16`, `float16`, also `fp32`, `bf16`, `fp16`)."""
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)} (or auto), got {name!r}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def config_dtype(config) -> torch.dtype | None:
    """The dtype a model config records (from_pretrained and save_pretrained write what they hold), if any."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype if isinstance(dtype, torch.dtype) else None


def stored_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's weights are stored in: its config's, else its input embeddings', which
    `prepare` never changes."""
    return config_dtype(model.config) or model.get_input_embeddings().weight.dtype


@dataclass(frozen=True)
class Compute:
    """How a model runs: bf16 autocast or fp32, and why (for the log)."""

    autocast: bool
    reason: str

    def describe(self, stored: torch.dtype) -> str:
        how = "bf16 autocast" if self.autocast else "fp32 (half-precision weights upcast one layer at a time)"
        if stored == torch.float32 and not self.autocast:
            how = "fp32"
        return f"weights kept in {dtype_name(stored)}, computing in {how}: {self.reason}"


def choose(device: str | torch.device = "cpu") -> Compute:
    """bf16 autocast where it pays on `device`, else fp32, measured on CPUs (see lm.cpu_has_fast_bf16)."""
    from offsite.lm import cpu_has_fast_bf16

    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Compute(True, f"{torch.cuda.get_device_name(device)} supports bf16")
        return Compute(False, f"{torch.cuda.get_device_name(device)} has no bf16")
    if cpu_has_fast_bf16():
        return Compute(True, "bf16 matmuls measured faster than fp32 on this CPU")
    return Compute(False, "bf16 matmuls measured no faster than fp32 on this CPU")


VALUES_PER_CAST = 1 << 22  # weight values cast at once (16 MiB in fp32): an LM head is cast a slice at a time


def _slices(weight: torch.Tensor, transposed: bool) -> list[tuple[int, int]]:
    """Output-row ranges of `weight` of at most VALUES_PER_CAST values each."""
    rows, width = (weight.shape[1], weight.shape[0]) if transposed else weight.shape
    step = max(1, VALUES_PER_CAST // max(width, 1))
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


def _rows(weight: torch.Tensor, transposed: bool, lo: int, hi: int, dtype: torch.dtype) -> torch.Tensor:
    """Output rows lo..hi of the weight as (rows x in), cast to `dtype`."""
    return (weight[:, lo:hi].t() if transposed else weight[lo:hi]).to(dtype)


class _UpcastMatmul(torch.autograd.Function):
    """x @ W^T (+ b) with W cast to x's dtype for the call only, a slice of rows at a time; backward recasts
    W instead of keeping the cast. Gradients for W and b (in their own dtype) only where they require
    them: frozen weights are the point, and for them x is not even kept."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool):
        ctx.transposed, ctx.has_bias = transposed, bias is not None
        ctx.save_for_backward(weight, x if ctx.needs_input_grad[1] else None)
        parts = [F.linear(x, _rows(weight, transposed, lo, hi, x.dtype), None if bias is None else bias[lo:hi].to(x.dtype))
                 for lo, hi in _slices(weight, transposed)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weight, x = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            for lo, hi in _slices(weight, ctx.transposed):
                part = grad[..., lo:hi] @ _rows(weight, ctx.transposed, lo, hi, grad.dtype)
                grad_x = part if grad_x is None else grad_x.add_(part)
        grad_w = grad_b = None
        if ctx.needs_input_grad[1]:  # a weight that trains is small enough to take whole
            g = grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])  # out x in
            grad_w = (g.t() if ctx.transposed else g).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_w, grad_b, None


def _plain(weight: torch.Tensor, x: torch.Tensor) -> bool:
    return weight.dtype == x.dtype or torch.is_autocast_enabled(x.device.type)


class UpcastLinear(nn.Linear):
    """nn.Linear whose half-precision weight is computed with in the input's dtype, one call at a time.
    Same parameters and state-dict names as nn.Linear; plain nn.Linear when the dtypes agree."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _plain(self.weight, x):
            return super().forward(x)
        return _UpcastMatmul.apply(x, self.weight, self.bias, False)


def _upcast_conv1d_forward(self, x: torch.Tensor) -> torch.Tensor:
    """GPT-2's Conv1D (weight stored as in x out) the same way."""
    if _plain(self.weight, x):
        return type(self).__mro__[1].forward(self, x)
    shape = x.shape[:-1] + (self.nf,)
    return _UpcastMatmul.apply(x.reshape(-1, x.shape[-1]), self.weight, self.bias, True).reshape(shape)


_CONV1D_CLASSES: dict[type, type] = {}


def _upcast_class(module: nn.Module) -> type | None:
    """The upcasting class for a plain linear layer, or None (quantized layers, peft layers: not ours)."""
    cls = type(module)
    if cls is nn.Linear:
        return UpcastLinear
    if cls.__name__ == "Conv1D":
        if cls not in _CONV1D_CLASSES:
            _CONV1D_CLASSES[cls] = type("UpcastConv1D", (cls,), {"forward": _upcast_conv1d_forward})
        return _CONV1D_CLASSES[cls]
    return None


def _to_fp32(output):
    return output.float() if isinstance(output, torch.Tensor) and output.dtype in HALF else output


def prepare(model: nn.Module) -> nn.Module:
    """Make a model stored in half precision run with an fp32 residual stream, in place: linear layers
    compute per call (see module doc), embeddings hand fp32 on, small tensors (norms, biases) become
    fp32. Large frozen tensors keep their stored dtype. A model stored in fp32 is left as it is."""
    if stored_dtype(model) not in HALF:
        return model
    if max((p.numel() for p in model.parameters() if p.dim() == 2), default=0) >= LARGE:
        return_freed_memory()  # the per-layer casts would otherwise stay with the heap (offsite.memory)
    for module in model.modules():
        cls = _upcast_class(module)
        if cls is not None:
            module.__class__ = cls
            if hasattr(module, "_old_forward"):  # accelerate's placement hook calls the forward it found
                module._old_forward = types.MethodType(cls.forward, module)
        elif isinstance(module, nn.Embedding) and not getattr(module, "_offsite_fp32_out", False):
            module.register_forward_hook(lambda _m, _i, out: _to_fp32(out))
            module._offsite_fp32_out = True
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for param in model.parameters():
        if param.dtype in HALF and param.dim() <= 1 and id(param) not in tables:  # norms, biases: a vector each
            param.data = param.data.float()
    for module in model.modules():  # e.g. rotary frequencies; persistence is kept as it was
        for attr, buf in module._buffers.items():
            if buf is not None and buf.dtype in HALF:
                module._buffers[attr] = buf.float()
    return model


def master_weights(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """What trains is fp32 (the optimizer's updates would vanish in bf16's 8-bit mantissa); in place."""
    for p in params:
        if p.dtype in HALF:
            p.data = p.data.float()
    return params


def stored_state(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`tensors` with every floating-point tensor cast to `dtype`; others (token ids) and offloaded ones
    (meta tensors, which save_pretrained reads back from disk as stored) as they are."""
    return {k: v.to(dtype) if v.is_floating_point() and v.device.type != "meta" else v for k, v in tensors.items()}
