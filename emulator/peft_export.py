"""A LoRA job's result as a standard PEFT LoRA adapter on the full model, for servers that take LoRA.

The global adapter of a LoRA job is dense: the coordinator merges every client's low-rank update into the
adapter blocks and averages the merged weights (offsite.emulator.methods). Its change to each linear
layer of the adapter blocks is therefore the mean of the clients' B·A products, summed over the rounds:
of rank at most r x (updates aggregated). A truncated SVD at that rank gives LoRA factors B', A' with
B'·A' equal to the change (to rounding), keyed to the full model's own layer indices, in the folder layout
`PeftModel.from_pretrained(base, folder)`, `vllm serve --enable-lora --lora-modules` and LoRAX load.

Only the linear layers' weights may differ from the base's (the LoRA and AdaLoRA methods); anything else
that changed (a norm, a bias: another method's result) cannot be said as LoRA and is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from offsite.emulator.adapter import adapter_parameters
from offsite.emulator.blocks import find_blocks
from offsite.emulator.plan import SplitPlan
from offsite.errors import ConfigError
from offsite.files import write_json

LORA_METHODS = ("lora", "adalora")
REPORT = "offsite-peft.json"


@dataclass(frozen=True)
class PeftExport:
    folder: Path
    rank: int
    layers: int               # linear layers with LoRA factors
    max_relative_error: float  # largest ||B'A' - change|| / ||change|| over those layers (Frobenius)


def _linears(model: nn.Module, plan: SplitPlan) -> dict[str, nn.Module]:
    """Canonical weight name -> module, for every linear layer (nn.Linear, GPT-2's Conv1D) of the adapter blocks."""
    found = find_blocks(model)
    out = {}
    for index in plan.adapter_blocks:
        for name, module in found.blocks[index].named_modules():
            if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
                out[f"{found.path}.{index}.{name}.weight"] = module
    return out


def _factors(change: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """B (out x rank), A (rank x in) with B @ A the best rank-`rank` approximation of `change` (out x in),
    and its relative error."""
    u, s, vh = torch.linalg.svd(change, full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b, a = u[:, :k] * root, root[:, None] * vh[:k]
    if k < rank:  # a layer narrower than the rank: zero factors fill it, so every layer has the one rank
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
    norm = float(torch.linalg.matrix_norm(change))
    error = float(torch.linalg.matrix_norm(change - b @ a)) / norm if norm else 0.0
    return b, a, error


def export_peft(full: nn.Module, plan: SplitPlan, adapter: dict[str, torch.Tensor], out_dir: str | Path, rank: int,
                base_name: str, dtype: torch.dtype | None = None) -> PeftExport:
    """Write the change `adapter` makes to `full` (the untouched base, as `load_base` gives it) as a PEFT
    LoRA adapter of rank `rank` in `out_dir`, its factors in `dtype` (None: fp32)."""
    if rank < 1:
        raise ConfigError(f"a LoRA export needs rank >= 1, got {rank}")
    if plan.extras:  # a tied head would need its LoRA to be the embedding's, which a plain PEFT load does not make
        raise ConfigError(f"the adapter trains {list(plan.extras)[:3]} beyond its blocks (train_extra): a PEFT LoRA export "
                          f"holds only the blocks' linear layers; export it merged")
    live = adapter_parameters(full, plan, on_emulator=False)
    if set(live) != set(adapter):
        raise ConfigError("the adapter does not fit this base: it was made for another model or split")
    linears = _linears(full, plan)
    transposed = full.config.model_type == "gpt2"  # Conv1D stores weights in x out: peft's fan_in_fan_out
    tensors, errors, leaves = {}, [], set()
    with torch.no_grad():
        for name, param in live.items():
            change = adapter[name].float() - param.float()
            if not change.any():
                continue
            if name not in linears:
                raise ConfigError(f"the adapter changes {name}, which is not a linear layer's weight: only a "
                                  f"{' or '.join(LORA_METHODS)} job can be exported as a LoRA adapter")
            b, a, error = _factors(change.t() if transposed else change, rank)
            module = name.removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(dtype or torch.float32).contiguous()
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(dtype or torch.float32).contiguous()
            errors.append(error)
            leaves.add(module.rsplit(".", 1)[-1])
    if not tensors:
        raise ConfigError("the adapter equals the base: there is no change to export")
    from peft import LoraConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in tensors})
    LoraConfig(r=rank, lora_alpha=rank, target_modules=sorted(leaves), layers_to_transform=sorted(plan.adapter_blocks),
               layers_pattern=find_blocks(full).path.rsplit(".", 1)[-1], fan_in_fan_out=transposed, lora_dropout=0.0,
               bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_name).save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    result = PeftExport(out_dir, rank, len(modules), max(errors))
    write_json(out_dir / REPORT, {"rank": rank, "layers": modules, "max_relative_error": result.max_relative_error})
    return result
