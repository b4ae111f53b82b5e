"""Making a job (its emulator bundle, skeleton and specs, stored as blobs, and round 0), cancelling one, retrying
its failed finalization, and deleting one with the files and blobs only it uses."""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from offsite.cloud.intake import sealed_size
from offsite.cloud.job import Artifacts, JobConfig
from offsite.cloud.preflight import check_job_data
from offsite.cloud.state import JobRecord
from offsite.cloud.tracking import check_available
from offsite.emulator import methods, support
from offsite.emulator.build import build, load_tokenizer
from offsite.emulator.bundle import load_bundle
from offsite.errors import AlreadyExistsError, ConfigError, PreconditionError
from offsite.precision import dtype_name
from offsite.tensors import spec_digest, spec_of

if TYPE_CHECKING:
    from offsite.cloud.coordinator import Coordinator

log = logging.getLogger("offsite.cloud")

# why a job with this status cannot be deleted yet, and what to do; every other status can be
NOT_DELETABLE = {
    "created": "its emulator is being built, or its creation was killed: `offsite cloud jobs cancel {job}` first",
    "running": "`offsite cloud jobs cancel {job}` first",
    "finalizing": "delete it once it is done or failed",
}


@dataclass(frozen=True)
class Deleted:
    """What deleting a job removed, and what it left."""
    blobs: int                 # blobs no other job names
    bytes: int                 # their size
    export_kept: Path | None   # the job's export, outside the state folder ([job] export_dir): the owner's to remove


class JobAdmin:
    def __init__(self, coordinator: Coordinator):
        self.c = coordinator

    def create_job(self, cfg: JobConfig) -> JobRecord:
        """Take the job's id (the job is `created` meanwhile: listed, its clients told to wait), build the
        emulator bundle and skeleton, store them as blobs, and start the job with round 0 open. A creation
        that fails leaves no job behind; one killed midway leaves it created, for `jobs cancel`."""
        check_available(cfg)
        try:
            self.c.state.add_job(cfg.job_id, cfg.to_json(), self.c.now())
        except AlreadyExistsError:
            raise AlreadyExistsError(f"job {cfg.job_id} already exists; its bundle is left as it is") from None
        try:
            artifacts, initial = self._build(cfg)
        except BaseException:
            self.c.state.forget_job(cfg.job_id)
            raise
        self.c.state.start_job(cfg.job_id, artifacts.to_json(), self.c.blobs.put_tensors(initial), self.c.now())
        log.info("job %s created", cfg.job_id)
        self.c.tracking.job_started(cfg)
        roster = self.roster(cfg)
        if cfg.clients_per_round > len(roster):
            log.warning("job %s needs %d updates to close a round at once (clients_per_round) but %d client(s) can take "
                        "part (%s): %s", cfg.job_id, cfg.clients_per_round, len(roster), ", ".join(sorted(roster)) or "none",
                        f"rounds close only at round_timeout_s ({cfg.round_timeout_s:g} s) with min_clients"
                        if cfg.round_timeout_s else "no round will close; add clients or lower clients_per_round")
        return self.c.state.job(cfg.job_id)

    def roster(self, cfg: JobConfig) -> set[str]:
        """The client names that can train the job: its roster's, or every client enrolled or with a token."""
        clients = self.c.state.clients()
        revoked = {c.name for c in clients if c.revoked_at is not None}
        known = {c.name for c in clients if c.revoked_at is None} | (self.c.state.token_names() - revoked)
        return {n for n in known if cfg.on_roster(n)} | (set(cfg.clients) if cfg.clients else set())

    def _build(self, cfg: JobConfig) -> tuple[Artifacts, dict[str, torch.Tensor]]:
        """The job's artifacts and its first global adapter."""
        blobs = self.c.blobs
        job_dir = self.c.layout.jobs / cfg.job_id
        # what a deleted or failed job of this id left: its files are hard links to blobs, which the build would
        # write through (another job may share those blobs)
        shutil.rmtree(job_dir / "bundle", ignore_errors=True)
        tokenizer = load_tokenizer(cfg.base_model, cfg.chat_template or None)
        check_job_data(tokenizer, cfg.eval_sets, cfg.task_sets, cfg.protection_data, cfg.chat_template)
        result = build(cfg.base_model, cfg.emulator_config(), job_dir / "bundle", placement=cfg.placement(job_dir),
                       chat_template=cfg.chat_template or None)
        bundle_files = {p.name: blobs.put_file(p) for p in sorted(result.bundle_dir.iterdir()) if p.is_file()}
        method = cfg.method_config()
        emulator, _, _ = load_bundle(result.bundle_dir)
        torch.manual_seed(cfg.seed)  # the method's fresh tensors (virtual tokens, bottlenecks) are repeatable
        initial = {**result.skeleton, **methods.fresh_extras(emulator, result.plan, method)}
        spec = spec_of(initial)
        attached = support.probe(emulator, result.plan, method, initial)  # a method the model cannot run fails here
        upload_dtype = cfg.resolved_dtype("upload_dtype", result.dtype)
        update_spec = spec_of(methods.trainable_state(attached, result.plan, method, dtype=upload_dtype))  # what clients upload
        artifacts = Artifacts(
            manifest=bundle_files["offsite-manifest.json"],
            bundle_files=bundle_files,
            bundle_dir=str(result.bundle_dir),
            plan=result.plan,
            spec=spec,
            update_spec=update_spec,
            upload_dtype=dtype_name(upload_dtype),
            skeleton_digest=spec_digest(spec),
            params={"full": result.full_params, "emulator": result.emulator_params, "adapter": result.adapter_params},
            # the tensors a masked input covers: those the method can change
            secagg_shapes=({k: spec[k][0] for k in sorted(methods.touched(method, update_spec))}
                           if cfg.secure_aggregation else None),
        )
        largest = sealed_size(cfg, artifacts)[1]
        if largest > cfg.max_update_bytes:
            raise ConfigError(f"an update of this job seals to up to {largest} bytes, above its max_update_bytes "
                              f"({cfg.max_update_bytes}): raise max_update_bytes")
        return artifacts, initial

    def cancel_job(self, job_id: str) -> None:
        """Stop a running job: its clients are told it is done at their next call, its open round never
        closes, and its unfinished uploads are dropped. A round being aggregated right now cannot close
        after this (the state's close is a compare-and-set on the job's status)."""
        self.c.state.set_job_status(job_id, "cancelled")
        self.c.secure.drop(job_id)
        self.c.proposals.drop(job_id)
        self.c.intake.drop_job(job_id)
        log.info("job %s cancelled", job_id)

    def retry_finalization(self, job_id: str) -> None:
        """Finalize again a job that failed in finalization (see State.retry_finalization); a running `serve`
        takes it up within a second (offsite.cloud.finalize.Finalizer.poll), or the next one as it starts."""
        self.c.state.retry_finalization(job_id)
        log.info("job %s: finalization to run again", job_id)

    def delete_job(self, job_id: str) -> Deleted:
        """Remove a job nothing writes to any more: its state rows first, in one transaction (the id is free
        from then on; a crash after it leaves only files that no job names, harmless), then its folder, the
        spool files of its unfinished uploads and the blobs no other job names: blobs are content-addressed,
        and jobs on one base share their bundle files and first adapter."""
        state, job = self.c.state, self.c.state.job(job_id)
        if job.status in NOT_DELETABLE:
            raise PreconditionError(f"job {job_id} is {job.status}: {NOT_DELETABLE[job.status].format(job=job_id)}")
        mine = self.named_blobs(job)
        uploads = [u.upload_id for u in state.open_uploads() if u.job_id == job_id]
        export_dir = JobConfig.from_json(job.config_json).export_dir
        state.delete_job(job_id)
        shutil.rmtree(self.c.layout.jobs / job_id, ignore_errors=True)
        for upload_id in uploads:
            self.c.intake.spool.discard(upload_id)
        others = set().union(*map(self.named_blobs, state.jobs()))  # read after the commit: a job started meanwhile counts
        freed = [self.c.blobs.remove(digest) for digest in sorted(mine - others)]
        log.info("job %s deleted with %d blobs (%d bytes) only it named", job_id, len(freed), sum(freed))
        return Deleted(len(freed), sum(freed), Path(export_dir) if export_dir else None)

    def named_blobs(self, job: JobRecord) -> set[str]:
        """Every blob the job's rows name: its artifacts' (none before it started), its rounds' global adapters,
        its updates."""
        state = self.c.state
        named = set() if job.artifacts_json == "{}" else Artifacts.from_json(job.artifacts_json).blobs()  # add_job's '{}'
        for r in state.rounds(job.job_id):
            named |= {r.adapter_sha256, *filter(None, [r.result_sha256])}
        return named | {u.blob_sha256 for u in state.updates(job.job_id)}
