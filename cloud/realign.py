"""The coordinator's side of FedBiOT's re-alignment (offsite.emulator.realign): when a round that closes
is one of every `realign_every`, the emulator, as clients hold it now (the bundle with the job's last
patch), is distilled toward the full model with the new global adapter plugged into both, and the new
patch is stored as a blob that the next rounds' tasks name.

It runs where the round closes, on the round worker, and loads the full model and the emulator for it
(the same distillation a job's creation runs, on the CPU): the job's next round opens once its clients'
emulator is ready.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from offsite import lm
from offsite.emulator.distill import DistillConfig
from offsite.emulator.realign import realign_bundle
from offsite.tensors import load_blob
from offsite.textdata import read_texts

if TYPE_CHECKING:
    from offsite.cloud.coordinator import Coordinator
    from offsite.cloud.job import Job

log = logging.getLogger("offsite.cloud")


def due(job: Job) -> bool:
    """Whether closing the job's open round re-aligns: every realign_every rounds, never after the last."""
    every = job.config.realign_every
    return bool(every) and (job.round + 1) % every == 0 and job.round + 1 < job.config.rounds


def realign_job(c: Coordinator, job: Job, adapter: dict[str, torch.Tensor]) -> str:
    """Re-align the job's emulator around `adapter` (the next round's global adapter); returns the new
    patch's blob digest."""
    cfg, art, started = job.config, job.artifacts, time.perf_counter()
    dcfg = DistillConfig(steps=cfg.realign_steps, lr=cfg.distill_lr, seed=cfg.seed + job.round + 1,
                         bf16=lm.cpu_has_fast_bf16())
    previous = load_blob(c.blobs.open_path(art.emulator_patch)) if art.emulator_patch else None
    patch = realign_bundle(cfg.base_model, art.bundle_dir, previous, cfg.method_config(), adapter,
                           read_texts(cfg.realign_data or cfg.distill_data), dcfg)
    digest = c.blobs.put_tensors(patch)
    log.info("job %s: emulator re-aligned after round %d in %.0f s (%d steps); patch %s... of %d tensors",
             job.job_id, job.round + 1, time.perf_counter() - started, dcfg.steps, digest[:12], len(patch))
    return digest
