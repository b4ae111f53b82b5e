"""Secure aggregation's runs: one per job, for its open round, held in this process's memory only. The
round worker closes a round from its run (see offsite.cloud.round_control)."""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from offsite.cloud.job import Job
from offsite.cloud.secure_round import SecureRound
from offsite.cloud.state import ClientRecord
from offsite.errors import PreconditionError
from offsite.secagg import vector
from offsite.secagg.protocol import Advert, Reveal, SealedShares

if TYPE_CHECKING:
    from offsite.cloud.coordinator import Coordinator


class SecureRuns:
    def __init__(self, coordinator: Coordinator):
        self.c = coordinator
        self._runs: dict[str, SecureRound] = {}  # job id -> the current round's secure-aggregation run (memory only)
        self.lock = threading.RLock()            # the runs, and what must change together with one

    def run(self, job: Job) -> SecureRound:
        """The current round's run, opened on first use."""
        cfg = job.config
        if not cfg.secure_aggregation:
            raise PreconditionError(f"job {job.job_id} does not use secure aggregation")
        run = self._runs.get(job.job_id)
        if run is None or run.round != job.round:
            run = self._runs[job.job_id] = SecureRound(
                job.job_id, job.round, cfg.clients_per_round, max(2, cfg.min_clients or cfg.clients_per_round),
                cfg.secagg_threshold, vector.length(job.artifacts.secagg_shapes), cfg.secagg_timeout_s, self.c.now())
        return run

    def current(self, job: Job) -> SecureRound | None:
        """The run of the job's open round, if this process holds one."""
        run = self._runs.get(job.job_id)
        return run if run is not None and run.round == job.round else None

    def drop(self, job_id: str) -> None:
        with self.lock:
            self._runs.pop(job_id, None)

    def secagg(self, client: ClientRecord, job_id: str, round_: int, advert: tuple[bytes, bytes, bytes] | None = None,
               shares: list[SealedShares] | None = None, reveal: Reveal | None = None) -> dict:
        """Take one client's message for the run's current stage (or none), close what is due, and return
        what the client's next stage needs: stage, roster (with enrolled identity keys), threshold, inbox,
        survivors, length and max_clients."""
        with self.lock:
            job = self.c.job(job_id)
            if job.status != "running" or round_ != job.round:
                raise PreconditionError(f"round {round_ + 1} of job {job_id} is not open")
            run, me, now = self.run(job), client.client_id, self.c.now()
            if me not in self.c.state.round(job_id, round_).selected:
                raise PreconditionError(f"client {me} is not selected for round {round_ + 1} of job {job_id}")
            if advert is not None:
                run.advert(Advert(me, *advert), now)
                self.c.state.touch_client(me, f"secure aggregation, round {round_ + 1}")
            if shares is not None:
                run.shares(me, shares)
            if reveal is not None:
                run.reveal(Reveal(me, reveal.seed_shares, reveal.key_shares))
            run.advance(now)
            s = run.server
            view = {"stage": run.stage, "threshold": s.threshold, "length": run.length, "max_clients": run.expected,
                    "roster": [], "inbox": [], "survivors": sorted(s.masked) if run.stage >= 4 else []}
            if run.stage >= 2 and not run.aborted:
                keys = {c.client_id: c.signing_key for c in self.c.state.clients()}
                view["roster"] = [(a, keys[a.client_id]) for a in (s.adverts[k] for k in sorted(s.adverts))]
            if run.stage == 3 and me in s.shares:
                view["inbox"] = s.inbox(me)
            if run.aborted or run.result is not None:
                self.c.wake.set()  # the round worker closes the round from the run
            run.raise_if_aborted()
            return view
