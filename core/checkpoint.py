"""Training checkpoints without pickle: one safetensors file holds the trainable parameters, the
optimizer's moments and the RNG, with the step, the data position and the optimizer's settings as JSON in
its header. Written atomically, so a `kill -9` leaves the last checkpoint whole and the same command
resumes from it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from offsite.files import atomic_write


@dataclass(frozen=True)
class Checkpointer:
    folder: Path
    key: str         # what is being trained (round, start adapter, settings): another key's checkpoint is ignored
    every: int = 50  # optimizer steps between checkpoints

    @property
    def path(self) -> Path:
        return self.folder / "checkpoint.safetensors"

    def save(self, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer, position: dict) -> None:
        state = opt.state_dict()
        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
        for index, slots in state["state"].items():
            for name, value in slots.items():
                tensors[f"opt.{index}.{name}"] = torch.as_tensor(value).cpu().contiguous()
        tensors["rng"] = torch.get_rng_state()
        meta = {"key": self.key, "position": position, "param_groups": state["param_groups"]}
        atomic_write(self.path, save(tensors, metadata={"offsite": json.dumps(meta)}), mode=0o600)

    def restore(self, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer) -> dict | None:
        """Load this key's last checkpoint into params and opt; return its position, or None."""
        if not self.path.is_file():
            return None
        with safe_open(str(self.path), framework="pt") as f:
            meta = json.loads(f.metadata()["offsite"])
            if meta["key"] != self.key:
                return None
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        with torch.no_grad():
            for i, p in enumerate(params):
                p.copy_(tensors[f"param.{i}"])
        slots: dict[int, dict] = {}
        for name, value in tensors.items():
            if name.startswith("opt."):
                _, index, slot = name.split(".", 2)
                slots.setdefault(int(index), {})[slot] = value
        opt.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})
        torch.set_rng_state(tensors["rng"])
        return meta["position"]

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
