"""Which models the inference server offers: every finished job of the coordinator's state, and the bases
they were tuned from, read from the state database (another process, `serve`, writes it)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from offsite.cloud.blobs import BlobStore
from offsite.cloud.job import Job
from offsite.cloud.state import State
from offsite.emulator.methods import MethodConfig
from offsite.emulator.plan import SplitPlan
from offsite.errors import NotFoundError, PreconditionError
from offsite.tensors import load_blob

SERVED_STATUS = "done"


@dataclass(frozen=True)
class ServedJob:
    job_id: str
    base: str                  # the base model's folder or hub id, as the job names it
    plan: SplitPlan
    method: MethodConfig
    adapter_digest: str        # the job's last global adapter
    created: int
    chat_template: str = ""    # the job's own template, for a base whose tokenizer has none


def base_name(base: str) -> str:
    """A base model's id in the API: a local folder's name, or the hub id."""
    return Path(base).name if Path(base).exists() else base


class Catalog:
    def __init__(self, state: State, blobs: BlobStore):
        self.state, self.blobs = state, blobs

    def job(self, job_id: str) -> ServedJob:
        record = self.state.job(job_id)            # NotFoundError for an unknown job
        if record.status != SERVED_STATUS:
            raise PreconditionError(f"job {job_id} is {record.status}, not finished: only finished jobs are served")
        job = Job.from_record(record)
        return ServedJob(job_id, job.config.base_model, job.artifacts.plan, job.config.method_config(),
                         self.state.global_adapters(job_id)[-1], 0,  # no job's artifacts ever held a created_at
                         job.config.chat_template)

    def jobs(self) -> list[ServedJob]:
        return [self.job(r.job_id) for r in self.state.jobs() if r.status == SERVED_STATUS]

    def adapter(self, job: ServedJob) -> dict[str, torch.Tensor]:
        return load_blob(self.blobs.open_path(job.adapter_digest))

    def resolve(self, model_id: str) -> tuple[ServedJob | None, str]:
        """(the job, its base) for a job id; (None, base) for a base's id."""
        try:
            job = self.job(model_id)
            return job, job.base
        except NotFoundError:
            pass
        for job in self.jobs():
            if base_name(job.base) == model_id:
                return None, job.base
        raise NotFoundError(f"no model {model_id!r}: a model is a finished job's id or the id of a base one was tuned from")
