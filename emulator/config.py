"""How to build an emulator: the split, and the optional distillation. Shared by CLI and coordinator."""
from __future__ import annotations

from dataclasses import dataclass

from offsite.errors import ConfigError


STRATEGIES = ("uniform", "similarity")
EXTRAS = ("norm", "head", "embeddings")  # what the adapter may train beyond its blocks


@dataclass(frozen=True)
class EmulatorConfig:
    bottom: int = 2
    top: int = 2
    emulator_layers: int = 2
    strategy: str = "uniform"         # "uniform" layer drop, or "similarity" (CRaSh-style clusters)
    quantize: str | None = None       # None, "int8" or "nf4": the middle blocks, packed by bitsandbytes
    attn_rank: int = 0                # >0: rank of the SVD approximation of kept blocks' attention (ScaleOT)
    calibration_data: str | None = None  # text for "similarity"; defaults to distill_data
    distill_data: str | None = None   # text the model owner provides (JSONL 'text' or .txt)
    distill_steps: int = 0            # 0: no distillation
    distill_lr: float = 1e-4
    distill_batch_size: int = 8
    seed: int = 0
    train_extra: tuple[str, ...] = ()  # beyond the adapter blocks: "norm", "head", "embeddings" (offsite.emulator.extras)
    share_blocks: bool = False        # each kept middle block also runs for the dropped ones it stands for (CRaSh)

    def __post_init__(self) -> None:
        object.__setattr__(self, "train_extra", tuple(self.train_extra))  # a TOML or JSON list
        if not set(self.train_extra) <= set(EXTRAS) or len(set(self.train_extra)) != len(self.train_extra):
            raise ConfigError(f"train_extra must name distinct ones of {', '.join(EXTRAS)}, got {list(self.train_extra)}")
        if min(self.bottom, self.top, self.emulator_layers) < 1:
            raise ConfigError(f"bottom, top and emulator_layers must be at least 1: {self}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.strategy == "similarity" and not (self.calibration_data or self.distill_data):
            raise ConfigError("strategy 'similarity' needs calibration_data (or distill_data) to measure blocks on")
        if self.quantize not in (None, "int8", "nf4"):
            raise ConfigError(f"quantize must be int8 or nf4, got {self.quantize!r}")
        if self.attn_rank < 0:
            raise ConfigError(f"attn_rank must be >= 0, got {self.attn_rank}")
        if self.distill_steps < 0:
            raise ConfigError(f"distill_steps must be >= 0, got {self.distill_steps}")
        if self.distill_steps and not self.distill_data:
            raise ConfigError("distill_steps > 0 needs distill_data (a text file to distill on)")

    @property
    def distilled(self) -> bool:
        return self.distill_steps > 0
