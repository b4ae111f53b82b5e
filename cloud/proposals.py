"""The global adapter an update proposes, made on a scratch emulator per job for the methods that merge."""
from __future__ import annotations

import contextlib
import gc
import threading
from typing import Iterator

import torch

from offsite.cloud.job import Job
from offsite.emulator import methods
from offsite.emulator.bundle import load_bundle


class Proposals:
    def __init__(self):
        self._scratch: dict[str, torch.nn.Module] = {}  # job id -> emulator that peft merges updates into
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def proposal(self, job: Job, start: dict[str, torch.Tensor],
                 update: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        """The global adapter an update proposes (see offsite.emulator.methods), for the with block only:
        for the methods that merge, it is the scratch emulator's own adapter blocks (no copy of them),
        which nobody else merges into until the block ends."""
        method, plan = job.config.method_config(), job.artifacts.plan
        if not method.merges:
            yield methods.propose(None, plan, method, start, update)
            return
        with self._lock:  # peft merges into one scratch emulator per job
            yield methods.propose(self._emulator(job), plan, method, start, update, copy=False)

    @contextlib.contextmanager
    def mean(self, job: Job, start: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]],
             weights: list[float]) -> Iterator[dict[str, torch.Tensor]]:
        """The weighted mean of the adapters `updates` of a method that merges propose, for the with block
        only: one peft merge for the lot where the method allows it (see offsite.emulator.methods.propose_mean)."""
        method, plan = job.config.method_config(), job.artifacts.plan
        with self._lock:
            yield methods.propose_mean(self._emulator(job), plan, method, start, updates, weights)

    def _emulator(self, job: Job) -> torch.nn.Module:
        if job.job_id not in self._scratch:
            self._scratch[job.job_id] = load_bundle(job.artifacts.bundle_dir)[0]
        return self._scratch[job.job_id]

    def drop(self, job_id: str, collect: bool = False) -> None:
        """Forget the job's scratch emulator; with `collect`, give its memory back now."""
        with self._lock:
            if self._scratch.pop(job_id, None) is not None and collect:
                gc.collect()
