"""What a client is told to do next: train a job's open round, wait, or stop. Reads only: a task never
closes a round (though it may fill a free seat)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from offsite.cloud.job import JobConfig
from offsite.cloud.state import ClientRecord
from offsite.errors import PreconditionError

log = logging.getLogger("offsite.cloud")

if TYPE_CHECKING:
    from offsite.cloud.coordinator import Coordinator

WAIT_S = 2.0   # how soon a client waiting for its round's close asks again
CREATED_WAIT_S = 10.0  # how soon a client of a job whose emulator is being built asks again


@dataclass(frozen=True)
class Task:
    kind: str                 # "wait" | "train" | "done"
    job_id: str
    round: int = 0
    total_rounds: int = 0
    bundle_manifest_sha256: str = ""
    adapter_sha256: str = ""
    skeleton_digest: str = ""
    config: JobConfig | None = None
    retry_after_s: float = 0.0
    heartbeat_s: float = 0.0
    upload_dtype: str = ""    # what the update's tensors must be in
    emulator_patch_sha256: str = ""  # re-alignment: the patch of the bundle's kept middle to train on ("" : none)


class Tasks:
    def __init__(self, coordinator: Coordinator):
        self.c = coordinator

    def next_task(self, client: ClientRecord) -> Task:
        """The client's next task over every job on whose roster it is: the oldest job that has it train,
        else the soonest wait; done once each of those jobs is over (wait while it is on none yet)."""
        options = [self._task(client, job.job_id) for job in self.c.jobs_of(client)]
        for kind in ("train", "wait"):
            of_kind = [(t, activity) for t, activity in options if t.kind == kind]
            if of_kind:
                task, activity = min(of_kind, key=lambda option: option[0].retry_after_s)
                self.c.state.touch_client(client.client_id, f"{activity} of job {task.job_id}")
                return task
        self.c.state.touch_client(client.client_id, "done" if options else "on no job's roster yet")
        return Task("done", "") if options else Task("wait", "", retry_after_s=10.0)

    def task(self, client: ClientRecord, job_id: str) -> Task:
        """Train when the client is selected for the job's open round and its update is not in yet, else
        wait (or done). A read: it never closes a round."""
        task, activity = self._task(client, job_id)
        self.c.state.touch_client(client.client_id, activity)
        return task

    def _task(self, client: ClientRecord, job_id: str) -> tuple[Task, str]:
        """The task, and what the client is doing for it (its activity on the status page)."""
        job = self.c.job(job_id)
        cfg, art, state = job.config, job.artifacts, self.c.state
        if not cfg.on_roster(client.name):
            raise PreconditionError(f"client {client.client_id} is not on the roster of job {job_id}")
        if job.status == "created":  # its emulator is being built: minutes, at real size
            return Task("wait", job_id, 0, cfg.rounds, retry_after_s=CREATED_WAIT_S), "waiting for the job to be created"
        if job.status != "running" or job.round >= cfg.rounds:
            return Task("done", job_id, job.round, cfg.rounds), "done"
        rnd, me = state.round(job_id, job.round), client.client_id
        if me not in rnd.selected and len(rnd.selected) < cfg.seats():  # a free seat: fill it now, not at the next tick
            self.c.rounds.fill_seats(job_id)
            rnd = state.round(job_id, job.round)
        if me not in rnd.selected:
            return (Task("wait", job_id, job.round, cfg.rounds, retry_after_s=max(WAIT_S, cfg.heartbeat_s)),
                    f"not selected for round {job.round + 1}")
        if state.has_update(job_id, job.round, me):
            return Task("wait", job_id, job.round, cfg.rounds, retry_after_s=WAIT_S), f"waiting for round {job.round + 1} to close"
        return (Task("train", job_id, job.round, cfg.rounds, art.manifest, rnd.adapter_sha256, art.skeleton_digest, cfg,
                     heartbeat_s=cfg.heartbeat_s, upload_dtype=art.upload_dtype,
                     emulator_patch_sha256=art.emulator_patch or ""),
                f"assigned round {job.round + 1}")

    def heartbeat(self, client: ClientRecord, job_id: str, round_: int, activity: str, progress: float,
                  failure: str = "") -> bool:
        """Record what the client is doing, or the failure it stopped on (written at once: the model owner
        sees it in `cloud status` and on the status page now, not at the next flush); tell it whether its
        round is still open."""
        if failure:
            reason = "".join(ch if ch.isprintable() else " " for ch in failure)[:240]
            log.warning("client %s (%s) stopped in job %s round %d: %s", client.name, client.client_id, job_id, round_ + 1, reason)
            self.c.state.touch_client(client.client_id, f"failed in round {round_ + 1}: {reason}")
            self.c.state.flush_touches()
        else:
            self.c.state.touch_client(client.client_id, f"{activity[:40]} round {round_ + 1} ({min(max(progress, 0.0), 1.0):.0%})")
        rec = self.c.state.job(job_id)
        return rec.status == "running" and rec.round == round_
