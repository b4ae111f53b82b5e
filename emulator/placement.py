"""Where the model owner's models live: one device, or accelerate's big-model placement.

A 70 B base does not fit one GPU: with `device_map` ("auto", "balanced", "sequential") accelerate spreads
its blocks over the GPUs, then the CPU, then disk (read back from the checkpoint, or `offload_folder`),
and its hooks move activations between them. `jobs create` and finalization load the base this way
(saving reads offloaded blocks back one at a time); the emulator, a fraction of the base, goes to `device`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from offsite.errors import ConfigError

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+|mps|xpu|xpu:\d+)$")
_MEMORY = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")


@dataclass(frozen=True)
class Placement:
    device: str = "cpu"                   # where a model goes whole, and where computation starts
    device_map: str | None = None         # accelerate's placement of the base over devices, CPU and disk
    max_memory: dict[str, str] = field(default_factory=dict)  # e.g. {"cuda:0": "70GiB", "cpu": "200GiB"}
    offload_folder: str | None = None     # where blocks that fit nowhere else go ("disk")

    def __post_init__(self) -> None:
        if not _DEVICE.match(self.device):
            raise ConfigError(f"device must be cpu, cuda, cuda:N, mps or xpu[:N], got {self.device!r:.40}")
        if self.device_map is not None and self.device_map not in DEVICE_MAPS:
            raise ConfigError(f"device_map must be one of {', '.join(DEVICE_MAPS)}, got {self.device_map!r:.40}")
        for key, value in self.max_memory.items():
            if not (_DEVICE.match(key) and isinstance(value, str) and _MEMORY.match(value)):
                raise ConfigError(f"max_memory takes device = size, e.g. \"cuda:0\" = \"70GiB\", got {key!r:.40} = {value!r:.40}")

    def _memory(self) -> dict:
        return {(int(k.split(":")[1]) if k.startswith("cuda:") else 0 if k == "cuda" else k): v for k, v in self.max_memory.items()}

    def load_kwargs(self, path_or_id: str, resident: tuple[str, ...] = ()) -> dict:
        """from_pretrained's placement arguments for the base. Modules named in `resident` (the adapter
        blocks, which a plug-in writes into) are never offloaded to disk: they stay in memory."""
        if not self.device_map:
            return {} if self.device == "cpu" else {"device_map": {"": self.device}}
        placed = self._device_map(path_or_id, resident) if resident else self.device_map
        return {"device_map": placed, **({"max_memory": self._memory()} if self.max_memory else {}),
                **({"offload_folder": self.offload_folder} if self.offload_folder else {})}

    def _device_map(self, path_or_id: str, resident: tuple[str, ...]) -> dict:
        """accelerate's placement for this base, computed on an empty (meta) copy, with every `resident`
        module that it put on disk moved to the CPU (a module placed as a whole is split into its children)."""
        import torch
        from accelerate import infer_auto_device_map, init_empty_weights
        from accelerate.utils import get_balanced_memory
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(path_or_id)
        with init_empty_weights():
            empty = AutoModelForCausalLM.from_config(config)
        empty.tie_weights()  # a tied head sits with its embeddings, as from_pretrained will place it
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        no_split = list(getattr(empty, "_no_split_modules", None) or [])
        memory = self._memory() or None
        if self.device_map != "sequential":
            memory = get_balanced_memory(empty, max_memory=memory, no_split_module_classes=no_split, dtype=dtype,
                                         low_zero=self.device_map == "balanced_low_0")
        placed = dict(infer_auto_device_map(empty, max_memory=memory, no_split_module_classes=no_split, dtype=dtype))
        for name in resident:
            while (owner := next((k for k in placed if k == "" or name == k or name.startswith(k + ".")), None)) is not None \
                    and owner != name and placed[owner] == "disk":
                parent = empty.get_submodule(owner) if owner else empty
                del placed[owner]
                prefix = f"{owner}." if owner else ""
                placed.update({prefix + child: "disk" for child, _ in parent.named_children()})
                placed.update({prefix + p: "disk" for p, _ in parent.named_parameters(recurse=False)})
            if placed.get(name) == "disk":
                placed[name] = "cpu"
        return placed


def onloaded(model, tensors: dict) -> dict:
    """`tensors` (named as in `model`) with every one that is offloaded (a meta tensor) read back from disk."""
    from transformers.integrations.accelerate import load_offloaded_parameter

    return {k: load_offloaded_parameter(model, k).to(v.dtype) if v.device.type == "meta" else v for k, v in tensors.items()}
