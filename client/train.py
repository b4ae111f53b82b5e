"""Local training: the adapter on top of the frozen emulator, on data that never leaves this machine."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from offsite import lm
from offsite.emulator.adapter import extract_adapter, freeze_all_but_adapter, load_adapter
from offsite.emulator.bundle import load_bundle
from offsite.errors import IntegrityError
from offsite.tensors import spec_digest, spec_of


@dataclass(frozen=True)
class RoundResult:
    adapter: dict[str, torch.Tensor]
    stats: lm.TrainStats
    heldout_before: float | None
    heldout_after: float | None


class LocalTrainer:
    """Holds the verified emulator in memory across rounds; each round starts from the global adapter."""

    def __init__(self, bundle_dir: Path, texts: list[str], heldout: list[str] | None, max_length: int):
        self.model, self.tokenizer, self.plan = load_bundle(bundle_dir)
        self.train_set = lm.encode(self.tokenizer, texts, max_length)
        self.heldout = lm.encode(self.tokenizer, heldout, max_length) if heldout else None

    def _heldout_loss(self) -> float | None:
        return lm.mean_token_loss(self.model, self.heldout, self.tokenizer.pad_token_id) if self.heldout else None

    def train_round(self, start: dict[str, torch.Tensor], skeleton_digest: str, cfg: lm.TrainConfig,
                    desc: str = "train", show_progress: bool = True, on_step=None) -> RoundResult:
        if spec_digest(spec_of(start)) != skeleton_digest:
            raise IntegrityError("the global adapter does not match the job's skeleton digest")
        load_adapter(self.model, self.plan, start, on_emulator=True)
        before = self._heldout_loss()
        params = freeze_all_but_adapter(self.model, self.plan, on_emulator=True)
        stats = lm.train(self.model, self.train_set, params, self.tokenizer.pad_token_id, cfg, desc, show_progress, on_step)
        return RoundResult(extract_adapter(self.model, self.plan, on_emulator=True), stats, before, self._heldout_loss())
