"""How to build an emulator: the split, and the optional distillation. Shared by CLI and coordinator."""
from __future__ import annotations

from dataclasses import dataclass

from offsite.errors import ConfigError


@dataclass(frozen=True)
class EmulatorConfig:
    bottom: int = 2
    top: int = 2
    emulator_layers: int = 2
    distill_data: str | None = None   # text the model owner provides (JSONL 'text' or .txt)
    distill_steps: int = 0            # 0: no distillation
    distill_lr: float = 1e-4
    distill_batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.bottom, self.top, self.emulator_layers) < 1:
            raise ConfigError(f"bottom, top and emulator_layers must be at least 1: {self}")
        if self.distill_steps < 0:
            raise ConfigError(f"distill_steps must be >= 0, got {self.distill_steps}")
        if self.distill_steps and not self.distill_data:
            raise ConfigError("distill_steps > 0 needs distill_data (a text file to distill on)")

    @property
    def distilled(self) -> bool:
        return self.distill_steps > 0
