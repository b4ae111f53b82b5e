"""Training checkpoints without pickle: one safetensors file holds the trainable parameters, the
optimizer's moments and the RNG, with the step, the data position and the optimizer's settings as JSON in
its header. Written atomically, so a `kill -9` leaves the last checkpoint whole and the same command
resumes from it."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from offsite.files import atomic_write


@dataclass
class Checkpointer:
    folder: Path
    key: str               # what is being trained (round, start adapter, settings): another key's checkpoint is ignored
    every: int = 50        # a checkpoint after this many optimizer steps...
    every_s: float = 60.0  # ...or once this many seconds passed since the last one (or the start), whichever is first
    _last: float = field(default_factory=time.monotonic, init=False, repr=False)

    def due(self, step: int) -> bool:
        """Whether to save after optimizer step `step`: slow steps (a big model on a small machine) still get a
        checkpoint every every_s seconds, fast ones every `every` steps."""
        return step % self.every == 0 or time.monotonic() - self._last >= self.every_s

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
        self._last = time.monotonic()

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
