"""The round worker's side of rounds: filling the open round's seats, closing rounds that are due (from
their updates, or from a secure-aggregation run), aggregating through the job's rule and server strategy,
and moving the job to its next round. Nothing on a request's path closes a round."""
from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from typing import TYPE_CHECKING, Iterator

import torch

from offsite import failpoints
from offsite.cloud import realign, robust, selection
from offsite.cloud.aggregate import WeightedMean, cap_weights, make_strategy
from offsite.cloud.job import Job, JobConfig
from offsite.cloud.privacy import ClippedNoisedMean, add_noise
from offsite.cloud.secure_round import SecureRound
from offsite.cloud.state import UpdateRecord, UpdatesArrivedError
from offsite.emulator import methods
from offsite.secagg import vector
from offsite.tensors import l2_norm, load_blob, save_tensors

if TYPE_CHECKING:
    from offsite.cloud.coordinator import Coordinator

log = logging.getLogger("offsite.cloud")
MERGE_BATCH = 32  # updates merged at once: one peft merge instead of 32; memory holds 32 (small) PEFT updates


class RoundControl:
    def __init__(self, coordinator: Coordinator):
        self.c = coordinator
        self._closing = threading.Lock()   # one round close at a time in this process (across processes: the state's CAS)
        self._seating = threading.Lock()   # one seat filling at a time in this process

    def tick(self) -> None:
        """The round worker's step (the server runs it each second and whenever `wake` is set): close every
        round that is due, fill the seats of every open round, and drop uploads that went idle. Only this
        and nothing on a request's path closes rounds, so no call waits for an aggregation."""
        for job in self.c.state.jobs():
            if job.status == "running":
                self._close_if_due(job.job_id)
                self.fill_seats(job.job_id)  # reads the job again: the close may have opened the next round
        self.c.intake.expire()
        self.c.state.flush_touches()  # last-seen times reach the database within about a second

    # --- seats ----------------------------------------------------------------------------------
    def fill_seats(self, job_id: str) -> None:
        """Select clients for the open round's free seats (see offsite.cloud.selection). The job is read under
        the lock: another thread may have filled them meanwhile."""
        with self._seating:
            self._fill_seats_locked(self.c.job(job_id))

    def _fill_seats_locked(self, job: Job) -> None:
        cfg, state = job.config, self.c.state
        if job.status != "running" or job.round >= cfg.rounds:
            return
        rnd, quiet_s = state.round(job.job_id, job.round), 3 * cfg.heartbeat_s
        now = time.time()  # the clock the state's last_seen times come from
        if cfg.secure_aggregation and len(rnd.selected) >= cfg.seats():
            return  # a secure run's roster is fixed once its seats are filled
        clients = {c.client_id: c for c in state.clients() if c.revoked_at is None and cfg.on_roster(c.name)}
        updated = {u.client_id for u in state.updates(job.job_id, job.round)}
        seats = selection.seats(cfg.seats(), rnd.selected, updated, {k: c.last_seen for k, c in clients.items()}, now, quiet_s)
        candidates = [k for k, c in clients.items() if k not in rnd.selected and now - c.last_seen <= quiet_s]  # alive ones
        if seats.free and candidates:
            chosen = selection.ranked(cfg.seed, job.job_id, job.round, candidates)[:seats.free]
            state.select_clients(job.job_id, job.round, chosen, self.c.now())
            log.info("job %s: round %d: selected %s", job.job_id, job.round + 1, ", ".join(chosen))

    # --- closing --------------------------------------------------------------------------------
    def _close_if_due(self, job_id: str) -> None:
        with self._closing:
            job = self.c.job(job_id)
            cfg, state = job.config, self.c.state
            if job.status != "running":
                return
            if cfg.secure_aggregation:
                with self.c.secure.lock:
                    run = self.c.secure.current(job)
                    if run is None:
                        if state.updates(job_id, job.round):  # masked inputs of a run this process never held
                            self._close_secure_round(job, None)
                        return
                    run.advance(self.c.now())
                    if run.aborted or run.result is not None:
                        self._close_secure_round(job, run)
                return
            updates, deadline = state.updates(job_id, job.round), state.round(job_id, job.round).deadline
            try:
                if len(updates) >= cfg.clients_per_round:
                    self._close_round(job, "all expected updates are in")
                elif (deadline is not None and len(updates) >= (cfg.min_clients or cfg.clients_per_round)
                      and self.c.now() >= deadline):
                    self._close_round(job, f"deadline of {cfg.round_timeout_s:g} s passed with {len(updates)} updates")
            except UpdatesArrivedError as e:  # an update came in while the round was aggregated: again, with it
                log.info("job %s: %s; aggregating again", job_id, e)
                self.c.wake.set()

    def _start(self, job: Job) -> dict[str, torch.Tensor]:
        """The global adapter the job's open round starts from."""
        return load_blob(self.c.blobs.open_path(self.c.state.round(job.job_id, job.round).adapter_sha256))

    def _close_secure_round(self, job: Job, run: SecureRound | None) -> None:
        """Close the round from the run's unmasked sum (noised under DP), or without an update when the run
        aborted or was lost to a restart."""
        cfg, start = job.config, self._start(job)
        if run is None or run.aborted:
            why = f"secure aggregation: {run.aborted if run else 'the coordinator restarted during secure aggregation'}"
            reason = "secagg_aborted"
        else:
            sums, weight = vector.read_sum(run.result, job.artifacts.secagg_shapes)
            change = {k: v / weight for k, v in add_noise(sums, cfg.dp_config()).items()}
            norm, inputs = l2_norm(change.values()), len(run.server.masked)
            most = inputs * (1 if cfg.dp_config().enabled or cfg.weighting == "equal" else cfg.max_examples_per_client)
            if not inputs - 1e-3 <= weight <= most + 1e-3:  # a client weighed its input beyond what it may claim
                why = (f"the {inputs} masked inputs claim a summed weight of {weight:.6g}, outside the {inputs}..{most} "
                       f"they may (weighting {cfg.weighting}, max_examples_per_client {cfg.max_examples_per_client})")
                reason = "weight"
            elif not cfg.max_update_norm or norm <= cfg.max_update_norm:
                mean = {k: v.double() + change[k] if k in change else v.double() for k, v in start.items()}
                self._advance(job, start, mean, f"secure aggregation of {inputs} masked inputs", inputs)
                return
            else:
                why = f"the aggregate moves the adapter by L2 norm {norm:.4g}, above the job's bound {cfg.max_update_norm:g}"
                reason = "norm"
        self.c.intake.reject(job.job_id, job.round, "(round)", why, reason)
        self._advance(job, start, None, f"without an update ({why})", len(self.c.state.updates(job.job_id, job.round)))

    def _close_round(self, job: Job, why: str) -> None:
        """Aggregate the round, then let the job's server strategy turn the result into the next global
        adapter. The mean streams: a running weighted sum, one update in memory at a time; a robust rule
        reads the proposals back from scratch files tensor by tensor. Safe to repeat after a crash: blobs
        are content-addressed and the job row moves in one transaction."""
        cfg, art = job.config, job.artifacts
        updates = self.c.state.updates(job.job_id, job.round)
        started = time.perf_counter()
        start = self._start(job)
        dp = cfg.dp_config()

        def proposals():  # each update as the dense adapter it proposes: exact for LoRA and IA3 too
            for u in updates:
                with self.c.proposals.proposal(job, start, load_blob(self.c.blobs.open_path(u.blob_sha256))) as proposal:
                    yield proposal  # the consumer adds or spills it before the next one is made

        if cfg.combine != "mean":
            result, how = self._combine_robustly(job, updates, proposals())
        elif dp.enabled:  # each proposal is clipped on its own
            mean = ClippedNoisedMean(start, dp, methods.touched(cfg.method_config(), art.update_spec))
            for proposal in proposals():
                mean.add(proposal)
            result, how = mean.result(), f"{len(updates)} updates aggregated"
            norms = [*(art.dp_norms or []), [round(n, 6) for n in mean.norms]]  # before clipping, per update
            job = dataclasses.replace(job, artifacts=dataclasses.replace(art, dp_norms=norms))
        else:
            mean, weights = WeightedMean(torch.float32 if _half(start) else torch.float64), round_weights(cfg, updates)
            if cfg.method_config().merges:  # a batch at a time, one merge each; the mean of batch means is the mean
                for i in range(0, len(updates), MERGE_BATCH):
                    batch = [load_blob(self.c.blobs.open_path(u.blob_sha256)) for u in updates[i:i + MERGE_BATCH]]
                    with self.c.proposals.mean(job, start, batch, weights[i:i + MERGE_BATCH]) as proposal:
                        mean.add(proposal, sum(weights[i:i + MERGE_BATCH]))
            else:  # each proposal streams in: one update in memory at a time
                for proposal, weight in zip(proposals(), weights):
                    mean.add(proposal, weight)
            result, how = mean.result(), f"{len(updates)} updates aggregated"
        self.c.metrics.aggregation_seconds.observe(time.perf_counter() - started)
        self._advance(job, start, result, f"{why}; {how}", len(updates))

    def _combine_robustly(self, job: Job, updates: list[UpdateRecord],
                          proposals: Iterator[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], str]:
        """The job's robust rule over the round's proposals, spilled to scratch files so that memory holds
        one proposal while they are written and a block of each while they are combined."""
        cfg = job.config
        folder = self.c.layout.scratch / f"{job.job_id}-round-{job.round}"
        shutil.rmtree(folder, ignore_errors=True)  # what a crash mid-close left
        folder.mkdir(parents=True)
        try:
            paths = []
            for i, proposal in enumerate(proposals):
                paths.append(folder / f"{i}.safetensors")
                save_tensors(proposal, paths[-1])
            rule, how = robust.make_combiner(cfg.combine, **cfg.combine_params), f"{cfg.combine} of {len(updates)} updates"
            if hasattr(rule, "select"):  # Krum and multi-Krum: say whose proposals were kept
                chosen = rule.select(paths).selected
                how += f", keeping {', '.join(updates[i].client_id for i in chosen)}"
                return robust.mean([paths[i] for i in chosen]), how
            return rule.combine(paths), how
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _advance(self, job: Job, start: dict[str, torch.Tensor], mean: dict[str, torch.Tensor] | None, why: str,
                 updates: int) -> None:
        """Store the next global adapter (the server strategy's step from the round's `mean` of `updates`
        updates, or `start` again without one) and move the job, with its artifacts, to the next round in one
        compare-and-set transaction: when another coordinator closed the round first, nothing changes."""
        cfg, art, job_id = job.config, job.artifacts, job.job_id
        strategy = make_strategy(cfg.aggregator, **cfg.aggregator_params)
        if mean is None:
            new_global = start
        else:
            state = load_blob(self.c.blobs.open_path(art.strategy_state)) if art.strategy_state else {}
            new_global, new_state = strategy.step(start, mean, state)
            art = dataclasses.replace(art, strategy_state=self.c.blobs.put_tensors(new_state) if new_state else None)
        result = self.c.blobs.put_tensors(new_global)
        if realign.due(job):  # the clients of the next round train on the emulator re-aligned around new_global
            art = dataclasses.replace(art, emulator_patch=realign.realign_job(self.c, job, new_global))
        failpoints.hit("cloud.round.closing")  # the new adapter is stored; the round has not closed yet
        done = job.round + 1 >= cfg.rounds
        if not self.c.state.close_round(job_id, job.round, updates=updates, result_sha256=result, reason=why,
                                        artifacts_json=art.to_json(), last=done, now=self.c.now()):
            log.info("job %s: round %d was closed by another coordinator", job_id, job.round + 1)
            return
        log.info("job %s: round %d/%d closed (%s) with %s", job_id, job.round + 1, cfg.rounds, why, strategy.name)
        self.c.secure.drop(job_id)
        if done:  # the scratch emulator's memory goes back before finalization loads the base
            self.c.proposals.drop(job_id, collect=True)
        self.c.metrics.rounds_completed.labels(job_id).inc()
        self.c.tracking.round_closed(cfg, self.c.state, job.round)  # before finalization can record the job's end
        for up in self.c.state.uploads(job_id, job.round):  # uploads that never completed are moot now
            self.c.intake.drop(up.upload_id)
        if done and self.c.on_training_done:
            self.c.on_training_done(job_id)


def _half(adapter: dict[str, torch.Tensor]) -> bool:
    return any(v.dtype in (torch.bfloat16, torch.float16) for v in adapter.values())


def round_weights(cfg: JobConfig, updates: list[UpdateRecord]) -> list[float]:
    """Each update's weight in the round's mean: its example count (bounded by the job's
    max_examples_per_client) or 1, then capped so that none passes max_weight_share of the round."""
    raw = [1.0 if cfg.weighting == "equal" else float(min(u.num_examples, cfg.max_examples_per_client)) for u in updates]
    return cap_weights(raw, cfg.max_weight_share)
