"""Jobs and rounds as plain objects: enrollment, tasks, blob access, update checks, round closing.

The gRPC servicer only translates messages to these calls; tests drive this class directly.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from offsite import failpoints
from offsite.cloud.aggregate import WeightedMean, cap_weights, make_strategy
from offsite.cloud.blobs import BlobStore
from offsite.cloud.identity import CertificateAuthority, StateLayout, hash_secret, load_sealing_key
from offsite.cloud.job import JobConfig
from offsite.cloud.limits import Limits
from offsite.cloud.metrics import Metrics
from offsite.cloud.privacy import ClippedNoisedMean, add_noise
from offsite.cloud import robust, selection
from offsite.cloud.secure_round import SecureRound
from offsite.cloud.state import ClientRecord, JobRecord, State, UpdateRecord, UpdatesArrivedError, UploadRecord
from offsite.cloud.uploads import UploadSpool
from offsite.emulator import methods
from offsite.emulator.build import build
from offsite.emulator.bundle import load_bundle
from offsite.emulator.plan import SplitPlan
from offsite.errors import (AlreadyExistsError, AuthError, ConfigError, InvalidRequestError, InvalidUpdateError, NotFoundError,
                            OutOfRangeError, PreconditionError, QuotaError, TooLargeError, shown)
from offsite.files import sha256_bytes
from offsite.precision import dtype_name
from offsite.secagg import vector
from offsite.secagg.protocol import Advert, Reveal, SealedShares
from offsite.sealing import OVERHEAD, SealContext, open_sealed, raw_public
from offsite.tensors import TensorSpec, check_matches, from_bytes, l2_norm, load_blob, payload_bounds, save_tensors, spec_digest, spec_of
from offsite.transport import CHUNK_BYTES

WAIT_S = 2.0   # how soon a client waiting for its round's close asks again
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HEADER_REFUSALS = {AlreadyExistsError: "duplicate", PreconditionError: "round_not_open", TooLargeError: "too_large",
                    QuotaError: "spool_quota", InvalidUpdateError: "bad_header"}  # a refused header's error -> its metric category
log = logging.getLogger("offsite.cloud")


@dataclass(frozen=True)
class Enrollment:
    client_id: str
    certificate_pem: bytes
    coordinator_public_key: bytes
    job_id: str


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


@dataclass(frozen=True)
class UploadHeader:
    job_id: str
    round: int
    num_examples: int
    size: int
    sha256: str
    train_loss: float | None = None   # the client's report of its mean training loss (monitoring only)


@dataclass(frozen=True)
class UploadSession:
    upload_id: str
    offset: int       # bytes held durably
    chunk_size: int


class Coordinator:
    def __init__(self, layout: StateLayout, state: State, blobs: BlobStore, sealing_key: X25519PrivateKey,
                 ca: CertificateAuthority, on_training_done: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time, chunk_bytes: int = CHUNK_BYTES, metrics: Metrics | None = None,
                 limits: Limits | None = None):
        self.layout, self.state, self.blobs = layout, state, blobs
        self.metrics = metrics or Metrics(state)
        self._sealing_key, self._ca, self._now = sealing_key, ca, clock
        self.chunk_bytes = chunk_bytes
        self.limits = limits or Limits()
        self.spool = UploadSpool(layout.uploads)
        self._uploads_lock = threading.Lock()  # one client's replace-then-open of an upload, and the quotas, at a time
        self._next_sweep = 0.0
        self._scratch: dict[str, torch.nn.Module] = {}  # job id -> emulator that peft merges updates into
        self._scratch_lock = threading.Lock()
        self._runs: dict[str, SecureRound] = {}  # job id -> the current round's secure-aggregation run (memory only)
        self.on_training_done = on_training_done  # called with the job id when its last round closes
        self._lock = threading.RLock()     # the secure-aggregation runs, held in this process's memory
        self._closing = threading.Lock()   # one round close at a time in this process (across processes: the state's CAS)
        self._seating = threading.Lock()   # one seat filling at a time in this process
        self.wake = threading.Event()      # set when a round may be due: an update accepted, a seat free; the worker ticks

    # --- jobs -----------------------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | Path, **options) -> Coordinator:
        """The coordinator of the state folder `root` (made by `offsite cloud init`); `options` as for __init__."""
        layout = StateLayout(Path(root))
        return cls(layout, layout.open_state(), BlobStore(layout.blobs), load_sealing_key(layout), CertificateAuthority.load(layout),
                   **options)

    def create_job(self, cfg: JobConfig) -> JobRecord:
        """Build the emulator bundle and skeleton, store them as blobs, and open round 0."""
        if any(j.job_id == cfg.job_id for j in self.state.jobs()):
            raise AlreadyExistsError(f"job {cfg.job_id} already exists; its bundle is left as it is")
        job_dir = self.layout.jobs / cfg.job_id
        result = build(cfg.base_model, cfg.emulator_config(), job_dir / "bundle", placement=cfg.placement(job_dir))
        bundle_files = {p.name: self.blobs.put_file(p) for p in sorted(result.bundle_dir.iterdir()) if p.is_file()}
        method = cfg.method_config()
        emulator, _, _ = load_bundle(result.bundle_dir)
        torch.manual_seed(cfg.seed)  # the method's fresh tensors (virtual tokens, bottlenecks) are repeatable
        initial = {**result.skeleton, **methods.fresh_extras(emulator, result.plan, method)}
        spec = spec_of(initial)
        attached, _ = methods.attach(methods.apply(emulator, result.plan, method, initial, share=True), result.plan, method)
        try:  # one token through the emulator: a method this model cannot run fails here, not on every client
            with torch.no_grad():
                attached(input_ids=torch.ones(1, 2, dtype=torch.long))
        except Exception as e:
            raise ConfigError(f"adapter method {method.name} does not run on model type "
                              f"{emulator.config.model_type!r}: {type(e).__name__}: {e}") from None
        upload_dtype = cfg.resolved_dtype("upload_dtype", result.dtype)
        update_spec = spec_of(methods.trainable_state(attached, result.plan, method, dtype=upload_dtype))  # what clients upload
        artifacts = {
            "manifest": bundle_files["offsite-manifest.json"],
            "bundle_files": bundle_files,
            "bundle_dir": str(result.bundle_dir),
            "plan": result.plan.to_dict(),
            "spec": spec,
            "update_spec": update_spec,
            "upload_dtype": dtype_name(upload_dtype),
            "skeleton_digest": spec_digest(spec),
            "params": {"full": result.full_params, "emulator": result.emulator_params, "adapter": result.adapter_params},
        }
        if cfg.secure_aggregation:  # the tensors a masked input covers: those the method can change
            artifacts["secagg_shapes"] = {k: spec[k][0] for k in sorted(methods.touched(method, update_spec))}
        largest = self._sealed_size(cfg, artifacts)[1]
        if largest > cfg.max_update_bytes:
            raise ConfigError(f"an update of this job seals to up to {largest} bytes, above its max_update_bytes "
                              f"({cfg.max_update_bytes}): raise max_update_bytes")
        self.state.add_job(cfg.job_id, cfg.to_json(), json.dumps(artifacts), self.blobs.put_tensors(initial), self._now())
        return self.state.job(cfg.job_id)

    def job(self, job_id: str) -> tuple[JobRecord, JobConfig, dict]:
        rec = self.state.job(job_id)
        return rec, JobConfig.from_json(rec.config_json), json.loads(rec.artifacts_json)

    def cancel_job(self, job_id: str) -> None:
        """Stop a running job: its clients are told it is done at their next call, its open round never
        closes, and its unfinished uploads are dropped. A round being aggregated right now cannot close
        after this (the state's close is a compare-and-set on the job's status)."""
        self.state.set_job_status(job_id, "cancelled")
        with self._lock:
            self._runs.pop(job_id, None)
        with self._scratch_lock:
            self._scratch.pop(job_id, None)
        with self._uploads_lock:
            for up in self.state.open_uploads():
                if up.job_id == job_id:
                    self._drop_upload(up.upload_id)
        log.info("job %s cancelled", job_id)

    def jobs_of(self, client: ClientRecord) -> list[tuple[JobRecord, JobConfig]]:
        """The jobs whose roster holds the client, oldest first."""
        jobs = ((rec, JobConfig.from_json(rec.config_json)) for rec in self.state.jobs())
        return [(rec, cfg) for rec, cfg in jobs if cfg.on_roster(client.name)]

    # --- identity -------------------------------------------------------------------------------
    def enroll(self, token: str, signing_key: bytes, csr_pem: bytes) -> Enrollment:
        """Consume the token, register the signing key, and sign the client's TLS certificate."""
        try:
            Ed25519PublicKey.from_public_bytes(signing_key)
        except ValueError:
            raise InvalidRequestError("signing_public_key must be a raw 32-byte Ed25519 public key") from None
        csr = self._ca.load_csr(csr_pem)  # a malformed request must not spend the token
        name = self.state.consume_token(hash_secret(token), self._now())
        if name is None:
            raise AuthError("enrollment token is unknown, already used or expired")
        client_id = f"{name}-{secrets.token_hex(4)}"
        certificate = self._ca.issue_client_certificate(csr, client_id)
        self.state.add_client(client_id, name, signing_key)
        log.info("client %s enrolled", client_id)
        running = [rec.job_id for rec, cfg in self.jobs_of(self.state.client(client_id)) if rec.status == "running"]
        return Enrollment(client_id, certificate, raw_public(self._sealing_key.public_key()), running[0] if running else "")

    def authenticate(self, client_id: str | None) -> ClientRecord:
        """The client behind a verified TLS client certificate; unknown or revoked clients are refused."""
        if not client_id:
            raise AuthError("this call needs mutual TLS with the client certificate issued at enrollment")
        try:
            client = self.state.client(client_id)
        except NotFoundError:
            raise AuthError(f"unknown client {client_id}") from None
        if client.revoked_at is not None:
            raise AuthError(f"client {client_id} is revoked")
        self.state.touch_client(client.client_id)
        return client

    # --- rounds ---------------------------------------------------------------------------------
    def tick(self) -> None:
        """The round worker's step (the server runs it each second and whenever `wake` is set): close every
        round that is due, fill the seats of every open round, and drop uploads that went idle. Only this
        and nothing on a request's path closes rounds, so no call waits for an aggregation."""
        for job in self.state.jobs():
            if job.status == "running":
                self._close_if_due(job.job_id)
                self._fill_seats(job.job_id)
        self.expire_uploads()

    def _fill_seats(self, job_id: str) -> None:
        """Select clients for the open round's free seats (see offsite.cloud.selection)."""
        with self._seating:
            self._fill_seats_locked(job_id)

    def _fill_seats_locked(self, job_id: str) -> None:
        rec, cfg, _ = self.job(job_id)
        if rec.status != "running" or rec.round >= cfg.rounds:
            return
        rnd, quiet_s = self.state.round(job_id, rec.round), 3 * cfg.heartbeat_s
        now = time.time()  # the clock the state's last_seen times come from
        if cfg.secure_aggregation and len(rnd.selected) >= cfg.seats():
            return  # a secure run's roster is fixed once its seats are filled
        clients = {c.client_id: c for c in self.state.clients() if c.revoked_at is None and cfg.on_roster(c.name)}
        updated = {u.client_id for u in self.state.updates(job_id, rec.round)}
        seats = selection.seats(cfg.seats(), rnd.selected, updated, {k: c.last_seen for k, c in clients.items()}, now, quiet_s)
        candidates = [k for k, c in clients.items() if k not in rnd.selected and now - c.last_seen <= quiet_s]  # alive ones
        if seats.free and candidates:
            chosen = selection.ranked(cfg.seed, job_id, rec.round, candidates)[:seats.free]
            self.state.select_clients(job_id, rec.round, chosen, self._now())
            log.info("job %s: round %d: selected %s", job_id, rec.round + 1, ", ".join(chosen))

    def expire_uploads(self) -> int:
        """Drop open uploads (and stray spool files) with no new part for `upload_idle_s`; checked at most
        once a minute. Ages come from the spool files' times, on the machine's clock. Returns how many."""
        now = time.time()
        if now < self._next_sweep:
            return 0
        self._next_sweep = now + min(60.0, self.limits.upload_idle_s / 10)
        cutoff, dropped = now - self.limits.upload_idle_s, 0
        with self._uploads_lock:
            open_ = self.state.open_uploads()
            for up in open_:
                written = self.spool.last_written(up.upload_id)
                if written is None or written < cutoff:
                    self._drop_upload(up.upload_id)
                    dropped += 1
            known = {u.upload_id for u in open_}
            for upload_id in self.spool.ids():  # a part that raced a replacement leaves a file with no upload
                written = self.spool.last_written(upload_id)
                if upload_id not in known and written is not None and written < cutoff:
                    self.spool.discard(upload_id)
        if dropped:
            log.info("dropped %d uploads with no new part for %g s", dropped, self.limits.upload_idle_s)
        return dropped

    def _close_if_due(self, job_id: str) -> None:
        with self._closing:
            rec, cfg, _ = self.job(job_id)
            if rec.status != "running":
                return
            if cfg.secure_aggregation:
                with self._lock:
                    run = self._runs.get(job_id)
                    if run is None or run.round != rec.round:
                        if self.state.updates(job_id, rec.round):  # masked inputs of a run this process never held
                            self._close_secure_round(job_id, None)
                        return
                    run.advance(self._now())
                    if run.aborted or run.result is not None:
                        self._close_secure_round(job_id, run)
                return
            updates, deadline = self.state.updates(job_id, rec.round), self.state.round(job_id, rec.round).deadline
            try:
                if len(updates) >= cfg.clients_per_round:
                    self._close_round(job_id, "all expected updates are in")
                elif (deadline is not None and len(updates) >= (cfg.min_clients or cfg.clients_per_round)
                      and self._now() >= deadline):
                    self._close_round(job_id, f"deadline of {cfg.round_timeout_s:g} s passed with {len(updates)} updates")
            except UpdatesArrivedError as e:  # an update came in while the round was aggregated: again, with it
                log.info("job %s: %s; aggregating again", job_id, e)
                self.wake.set()

    def next_task(self, client: ClientRecord) -> Task:
        """The client's next task over every job on whose roster it is: the oldest job that has it train,
        else the soonest wait; done once each of those jobs is over (wait while it is on none yet)."""
        options = [self._task(client, rec.job_id) for rec, _ in self.jobs_of(client)]
        for kind in ("train", "wait"):
            of_kind = [(t, activity) for t, activity in options if t.kind == kind]
            if of_kind:
                task, activity = min(of_kind, key=lambda option: option[0].retry_after_s)
                self.state.touch_client(client.client_id, f"{activity} of job {task.job_id}")
                return task
        self.state.touch_client(client.client_id, "done" if options else "on no job's roster yet")
        return Task("done", "") if options else Task("wait", "", retry_after_s=10.0)

    def task(self, client: ClientRecord, job_id: str) -> Task:
        """Train when the client is selected for the job's open round and its update is not in yet, else
        wait (or done). A read: it never closes a round."""
        task, activity = self._task(client, job_id)
        self.state.touch_client(client.client_id, activity)
        return task

    def _task(self, client: ClientRecord, job_id: str) -> tuple[Task, str]:
        """The task, and what the client is doing for it (its activity on the status page)."""
        rec, cfg, art = self.job(job_id)
        if not cfg.on_roster(client.name):
            raise PreconditionError(f"client {client.client_id} is not on the roster of job {job_id}")
        if rec.status != "running" or rec.round >= cfg.rounds:
            return Task("done", job_id, rec.round, cfg.rounds), "done"
        rnd, me = self.state.round(job_id, rec.round), client.client_id
        if me not in rnd.selected and len(rnd.selected) < cfg.seats():  # a free seat: fill it now, not at the next tick
            self._fill_seats(job_id)
            rnd = self.state.round(job_id, rec.round)
        if me not in rnd.selected:
            return (Task("wait", job_id, rec.round, cfg.rounds, retry_after_s=max(WAIT_S, cfg.heartbeat_s)),
                    f"not selected for round {rec.round + 1}")
        if self.state.has_update(job_id, rec.round, me):
            return Task("wait", job_id, rec.round, cfg.rounds, retry_after_s=WAIT_S), f"waiting for round {rec.round + 1} to close"
        return (Task("train", job_id, rec.round, cfg.rounds, art["manifest"], rnd.adapter_sha256, art["skeleton_digest"], cfg,
                     heartbeat_s=cfg.heartbeat_s, upload_dtype=art.get("upload_dtype", "float32")),  # older jobs: fp32
                f"assigned round {rec.round + 1}")

    def heartbeat(self, client: ClientRecord, job_id: str, round_: int, activity: str, progress: float) -> bool:
        """Record what the client is doing; tell it whether its round is still open."""
        self.state.touch_client(client.client_id, f"{activity[:40]} round {round_ + 1} ({min(max(progress, 0.0), 1.0):.0%})")
        rec = self.state.job(job_id)
        return rec.status == "running" and rec.round == round_

    # --- downloads ------------------------------------------------------------------------------
    def _offered(self, client: ClientRecord, digest: str) -> None:
        """Only the bundle files and global adapters of the running jobs on the client's roster are
        offered to it, never client updates."""
        for rec, _ in self.jobs_of(client):
            if rec.status == "running" and (digest in json.loads(rec.artifacts_json)["bundle_files"].values()
                                            or digest in self.state.global_adapters(rec.job_id)):
                return
        raise NotFoundError(f"blob {digest[:16]}... is not offered by a running job of client {client.client_id}")

    def blob_info(self, client: ClientRecord, digest: str) -> tuple[int, int, list[str]]:
        """(size, chunk size, SHA-256 of each chunk) of an offered blob."""
        self._offered(client, digest)
        return self.blobs.open_path(digest).stat().st_size, self.chunk_bytes, self.blobs.chunk_digests(digest, self.chunk_bytes)

    def download(self, client: ClientRecord, digest: str, first_chunk: int) -> Iterator[tuple[int, bytes]]:
        """The blob's chunks from `first_chunk` on, counted as bytes served to the client."""
        size, chunk, _ = self.blob_info(client, digest)
        if first_chunk * chunk >= max(size, 1):
            raise OutOfRangeError(f"chunk {first_chunk} is beyond the blob's {size} bytes")
        sent = 0
        try:
            for index, data in self.blobs.chunks(digest, chunk, first_chunk):
                yield index, data
                sent += len(data)
        finally:  # one state write per call, not per chunk: a synchronous commit per MiB halved throughput
            self.state.add_traffic(client.client_id, bytes_out=sent)
            self.metrics.bytes_sent.inc(sent)

    def check_upload_header(self, client: ClientRecord, header: UploadHeader) -> None:
        """Cheap checks before any bytes are read: right job and round, not yet accepted, size."""
        try:
            rec, cfg, art = self.job(header.job_id)
        except NotFoundError:  # not counted: a job id the client made up must not become a metric label
            raise PreconditionError(f"no job {shown(header.job_id)} is accepting updates") from None
        try:
            if self.state.has_update(header.job_id, header.round, client.client_id):
                # first: a client retrying after a crash ate its receipt learns its update counted, even if the
                # round has closed since
                raise AlreadyExistsError(f"an update from {client.client_id} for round {header.round} was already accepted")
            if rec.status != "running" or header.round != rec.round:
                raise PreconditionError(f"job {header.job_id} is not accepting updates for round {header.round} "
                                        f"(status {rec.status}, open round {rec.round})")
            if client.client_id not in self.state.round(header.job_id, header.round).selected:
                raise PreconditionError(f"client {client.client_id} is not selected for round {header.round} of job {header.job_id}")
            if header.size > cfg.max_update_bytes:
                raise TooLargeError(f"update of {header.size} bytes exceeds the job's limit of {cfg.max_update_bytes}")
            lo, hi = self._sealed_size(cfg, art)
            if not lo <= header.size <= hi:
                raise InvalidUpdateError(f"an update of job {header.job_id} seals to {lo}..{hi} bytes, not {header.size}")
            if not 1 <= header.num_examples <= cfg.max_examples_per_client:
                raise InvalidUpdateError(f"num_examples must be in 1..{cfg.max_examples_per_client} (the job's "
                                         f"max_examples_per_client), got {header.num_examples}")
            if not _SHA256.match(header.sha256):
                raise InvalidUpdateError("the header's sha256 must be 64 lowercase hex digits")
            if header.train_loss is not None and not (math.isfinite(header.train_loss) and header.train_loss >= 0):
                raise InvalidUpdateError("train_loss must be a finite number >= 0")
        except (AlreadyExistsError, PreconditionError, TooLargeError, InvalidUpdateError) as e:
            self.metrics.rejected(header.job_id, _HEADER_REFUSALS[type(e)])
            raise

    # --- uploads --------------------------------------------------------------------------------
    def begin_upload(self, client: ClientRecord, header: UploadHeader) -> UploadSession:
        """Open an upload, or find it again: its id depends only on the header, so a retry resumes it. A client
        has one open upload per job and round: a new header replaces the earlier one (a client that sealed
        again after a crash). Spool quotas, in total and per client, count announced sizes."""
        self.check_upload_header(client, header)
        key = f"{header.job_id}|{header.round}|{client.client_id}|{header.num_examples}|{header.size}|{header.sha256}"
        upload_id = hashlib.sha256(key.encode()).hexdigest()[:32]
        with self._uploads_lock:
            mine = self.state.client_uploads(client.client_id)
            for old in mine:
                if old.upload_id != upload_id and (old.job_id, old.round) == (header.job_id, header.round):
                    self._drop_upload(old.upload_id)
                    log.info("client %s: a new upload for round %d of job %s replaces its unfinished one", client.client_id,
                             header.round + 1, header.job_id)
            if upload_id not in {u.upload_id for u in mine}:
                self._check_quotas(client, header)
            self.spool.create(upload_id)  # before the record: the sweep never sees a record without its file's age
            self.state.open_upload(UploadRecord(upload_id, header.job_id, header.round, client.client_id,
                                                header.num_examples, header.size, header.sha256, header.train_loss))
        return UploadSession(upload_id, self.spool.offset(upload_id), self.chunk_bytes)

    def _check_quotas(self, client: ClientRecord, header: UploadHeader) -> None:
        mine, everyone = self.state.upload_bytes(client.client_id), self.state.upload_bytes()
        try:
            if mine + header.size > self.limits.spool_bytes_per_client:
                raise QuotaError(f"client {client.client_id} has {mine} bytes of uploads open; {header.size} more would pass "
                                 f"its spool quota of {self.limits.spool_bytes_per_client} (limit spool_bytes_per_client)")
            if everyone + header.size > self.limits.spool_bytes:
                raise QuotaError(f"the upload spool holds {everyone} bytes of open uploads; {header.size} more would pass "
                                 f"its quota of {self.limits.spool_bytes} (limit spool_bytes); try again later")
        except QuotaError:
            self.metrics.rejected(header.job_id, "spool_quota")
            raise

    @staticmethod
    def _sealed_size(cfg: JobConfig, art: dict) -> tuple[int, int]:
        """The fewest and most bytes a valid sealed update of this job can have."""
        lo, hi = payload_bounds(_upload_spec(cfg, art))
        return lo + OVERHEAD, hi + OVERHEAD

    def _open_upload(self, client: ClientRecord, upload_id: str) -> UploadRecord:
        try:
            up = self.state.upload(upload_id)
        except NotFoundError:
            up = None
        if up is None or up.client_id != client.client_id:  # another client's upload id reads as unknown
            raise NotFoundError(f"no open upload {upload_id[:16]!r} for client {client.client_id}; call BeginUpload")
        return up

    def append_upload(self, client: ClientRecord, upload_id: str, offset: int, data: bytes) -> int:
        """Append one part durably; returns the new offset."""
        up = self._open_upload(client, upload_id)
        try:
            new_offset = self.spool.append(upload_id, offset, data, up.size)
        except InvalidUpdateError as e:  # more bytes than announced: this upload can never verify
            self._drop_upload(upload_id)
            self._reject(up.job_id, up.round, client.client_id, str(e), "too_long")
            raise
        self.state.add_traffic(client.client_id, bytes_in=len(data))
        self.metrics.bytes_received.inc(len(data))
        return new_offset

    def finish_upload(self, client: ClientRecord, upload_id: str) -> tuple[int, int] | None:
        """If every byte is in, verify and count the update (once) and drop the upload, whatever the verdict.
        Returns (round, updates in round), or None while bytes are missing."""
        up = self._open_upload(client, upload_id)
        if self.spool.offset(upload_id) < up.size:
            return None
        header = UploadHeader(up.job_id, up.round, up.num_examples, up.size, up.sha256, up.train_loss)
        try:
            return self.submit_update(client, header, self.spool.read(upload_id))
        finally:
            self._drop_upload(upload_id)

    def _drop_upload(self, upload_id: str) -> None:
        self.spool.discard(upload_id)
        self.state.close_upload(upload_id)

    def _reject(self, job_id: str, round_: int, client_id: str, why: str, reason: str) -> None:
        """Record why an update was refused (free text, in the state database) and count it by `reason`."""
        self.state.add_rejection(job_id, round_, client_id, why)
        self.metrics.rejected(job_id, reason)

    def submit_update(self, client: ClientRecord, header: UploadHeader, envelope: bytes) -> tuple[int, int]:
        """Verify, decrypt and check an update; store and count it once. Returns (round, updates in round)."""
        self.check_upload_header(client, header)
        _, cfg, art = self.job(header.job_id)
        reason = "bad_digest"  # the check under way: what a refusal is counted as
        try:
            if len(envelope) != header.size or sha256_bytes(envelope) != header.sha256:
                raise InvalidUpdateError("upload bytes do not match the size and SHA-256 in the header")
            reason = "bad_seal"
            ctx = SealContext(header.job_id, header.round, client.client_id, art["skeleton_digest"])
            plaintext = open_sealed(envelope, ctx, self._sealing_key, Ed25519PublicKey.from_public_bytes(client.signing_key))
            reason = "bad_tensors"
            tensors = from_bytes(plaintext)
            check_matches(tensors, _upload_spec(cfg, art))  # a masked input's checks are then the protocol's
            if cfg.max_update_norm and not cfg.secure_aggregation:
                reason = "norm"
                start = load_blob(self.blobs.open_path(self.state.round(header.job_id, header.round).adapter_sha256))
                with self._proposal(header.job_id, cfg, art, start, tensors) as proposal:
                    self._check_norm(proposal, start, cfg.max_update_norm)
        except InvalidUpdateError as e:
            self._reject(header.job_id, header.round, client.client_id, str(e), reason)
            raise
        record = UpdateRecord(header.job_id, header.round, client.client_id, header.num_examples, self.blobs.put(plaintext),
                              len(envelope), self._now(), header.train_loss)
        if cfg.secure_aggregation:
            with self._lock:  # the masked input and its record together, in the run of the round it is for
                self.check_upload_header(client, header)  # the round may have moved while we decrypted
                self._secure_run(header.job_id).masked(client.client_id, tensors[vector.MASKED].numpy())
                count = self.state.add_update(record)
        else:
            self.check_upload_header(client, header)  # the round may have moved while we decrypted
            count = self.state.add_update(record)  # refused once the round is closed, even by another process
        if cfg.round_timeout_s:
            self.state.set_deadline(header.job_id, header.round, record.accepted_at + cfg.round_timeout_s)
        self.metrics.updates_accepted.labels(header.job_id).inc()
        log.info("job %s: round %d update from %s accepted (%d examples, %d bytes sealed)", header.job_id,
                 header.round + 1, client.client_id, header.num_examples, len(envelope))
        self.state.touch_client(client.client_id, f"update accepted for round {header.round + 1}")
        failpoints.hit("cloud.update.accepted")
        self.wake.set()  # the round worker closes the round if this update completes it
        return header.round, count

    @contextlib.contextmanager
    def _proposal(self, job_id: str, cfg: JobConfig, art: dict, start: dict[str, torch.Tensor],
                  update: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        """The global adapter an update proposes (see offsite.emulator.methods), for the with block only:
        for the methods that merge, it is the scratch emulator's own adapter blocks (no copy of them),
        which nobody else merges into until the block ends."""
        method, plan = cfg.method_config(), SplitPlan.from_dict(art["plan"])
        if not method.merges:
            yield methods.propose(None, plan, method, start, update)
            return
        with self._scratch_lock:  # peft merges into one scratch emulator per job
            if job_id not in self._scratch:
                self._scratch[job_id] = load_bundle(art["bundle_dir"])[0]
            yield methods.propose(self._scratch[job_id], plan, method, start, update, copy=False)

    @staticmethod
    def _check_norm(update: dict[str, torch.Tensor], start: dict[str, torch.Tensor], bound: float) -> None:
        """The L2 norm of the change a client proposes, over every tensor, must stay within the job's bound."""
        norm = l2_norm(update[k].double() - start[k].double() for k in update)
        if norm > bound:
            raise InvalidUpdateError(f"update moves the adapter by L2 norm {norm:.4g}, above the job's bound {bound:g}")

    # --- secure aggregation -------------------------------------------------------------------------
    def _secure_run(self, job_id: str) -> SecureRound:
        """The current round's run, opened on first use."""
        rec, cfg, art = self.job(job_id)
        if not cfg.secure_aggregation:
            raise PreconditionError(f"job {job_id} does not use secure aggregation")
        run = self._runs.get(job_id)
        if run is None or run.round != rec.round:
            run = self._runs[job_id] = SecureRound(
                job_id, rec.round, cfg.clients_per_round, max(2, cfg.min_clients or cfg.clients_per_round),
                cfg.secagg_threshold, vector.length(art["secagg_shapes"]), cfg.secagg_timeout_s, self._now())
        return run

    def secagg(self, client: ClientRecord, job_id: str, round_: int, advert: tuple[bytes, bytes, bytes] | None = None,
               shares: list[SealedShares] | None = None, reveal: Reveal | None = None) -> dict:
        """Take one client's message for the run's current stage (or none), close what is due, and return
        what the client's next stage needs: stage, roster (with enrolled identity keys), threshold, inbox,
        survivors, length and max_clients."""
        with self._lock:
            rec, cfg, _ = self.job(job_id)
            if rec.status != "running" or round_ != rec.round:
                raise PreconditionError(f"round {round_ + 1} of job {job_id} is not open")
            run, me, now = self._secure_run(job_id), client.client_id, self._now()
            if me not in self.state.round(job_id, round_).selected:
                raise PreconditionError(f"client {me} is not selected for round {round_ + 1} of job {job_id}")
            if advert is not None:
                run.advert(Advert(me, *advert), now)
                self.state.touch_client(me, f"secure aggregation, round {round_ + 1}")
            if shares is not None:
                run.shares(me, shares)
            if reveal is not None:
                run.reveal(Reveal(me, reveal.seed_shares, reveal.key_shares))
            run.advance(now)
            s = run.server
            view = {"stage": run.stage, "threshold": s.threshold, "length": run.length, "max_clients": run.expected,
                    "roster": [], "inbox": [], "survivors": sorted(s.masked) if run.stage >= 4 else []}
            if run.stage >= 2 and not run.aborted:
                keys = {c.client_id: c.signing_key for c in self.state.clients()}
                view["roster"] = [(a, keys[a.client_id]) for a in (s.adverts[k] for k in sorted(s.adverts))]
            if run.stage == 3 and me in s.shares:
                view["inbox"] = s.inbox(me)
            if run.aborted or run.result is not None:
                self.wake.set()  # the round worker closes the round from the run
            run.raise_if_aborted()
            return view

    def _close_secure_round(self, job_id: str, run: SecureRound | None) -> None:
        """Close the round from the run's unmasked sum (noised under DP), or without an update when the run
        aborted or was lost to a restart."""
        rec, cfg, art = self.job(job_id)
        start = load_blob(self.blobs.open_path(self.state.round(job_id, rec.round).adapter_sha256))
        if run is None or run.aborted:
            why = f"secure aggregation: {run.aborted if run else 'the coordinator restarted during secure aggregation'}"
            reason = "secagg_aborted"
        else:
            sums, weight = vector.read_sum(run.result, art["secagg_shapes"])
            change = {k: v / weight for k, v in add_noise(sums, cfg.dp_config()).items()}
            norm, inputs = l2_norm(change.values()), len(run.server.masked)
            most = inputs * (1 if cfg.dp_config().enabled or cfg.weighting == "equal" else cfg.max_examples_per_client)
            if not inputs - 1e-3 <= weight <= most + 1e-3:  # a client weighed its input beyond what it may claim
                why = (f"the {inputs} masked inputs claim a summed weight of {weight:.6g}, outside the {inputs}..{most} "
                       f"they may (weighting {cfg.weighting}, max_examples_per_client {cfg.max_examples_per_client})")
                reason = "weight"
            elif not cfg.max_update_norm or norm <= cfg.max_update_norm:
                mean = {k: v.double() + change[k] if k in change else v.double() for k, v in start.items()}
                self._advance(job_id, rec, cfg, art, start, mean, f"secure aggregation of {inputs} masked inputs", inputs)
                return
            else:
                why = f"the aggregate moves the adapter by L2 norm {norm:.4g}, above the job's bound {cfg.max_update_norm:g}"
                reason = "norm"
        self._reject(job_id, rec.round, "(round)", why, reason)
        self._advance(job_id, rec, cfg, art, start, None, f"without an update ({why})", len(self.state.updates(job_id, rec.round)))

    def _close_round(self, job_id: str, why: str) -> None:
        """Aggregate the round, then let the job's server strategy turn the result into the next global
        adapter. The mean streams: a running weighted sum, one update in memory at a time; a robust rule
        reads the proposals back from scratch files tensor by tensor. Safe to repeat after a crash: blobs
        are content-addressed and the job row moves in one transaction."""
        rec, cfg, art = self.job(job_id)
        updates = self.state.updates(job_id, rec.round)
        started = time.perf_counter()
        start = load_blob(self.blobs.open_path(self.state.round(job_id, rec.round).adapter_sha256))
        dp = cfg.dp_config()

        def proposals():  # each update as the dense adapter it proposes: exact for LoRA and IA3 too
            for u in updates:
                with self._proposal(job_id, cfg, art, start, load_blob(self.blobs.open_path(u.blob_sha256))) as proposal:
                    yield proposal  # the consumer adds or spills it before the next one is made

        if cfg.combine != "mean":
            result, how = self._combine_robustly(job_id, rec.round, cfg, updates, proposals())
        else:
            mean = (ClippedNoisedMean(start, dp, methods.touched(cfg.method_config(), art["update_spec"])) if dp.enabled
                    else WeightedMean(torch.float32 if _half(start) else torch.float64))
            for proposal, weight in zip(proposals(), round_weights(cfg, updates)):
                mean.add(proposal, weight)
            result, how = mean.result(), f"{len(updates)} updates aggregated"
            if dp.enabled:
                art.setdefault("dp_norms", []).append([round(n, 6) for n in mean.norms])  # before clipping, per update
        self.metrics.aggregation_seconds.observe(time.perf_counter() - started)
        self._advance(job_id, rec, cfg, art, start, result, f"{why}; {how}", len(updates))

    def _combine_robustly(self, job_id: str, round_: int, cfg: JobConfig, updates: list[UpdateRecord],
                          proposals: Iterator[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], str]:
        """The job's robust rule over the round's proposals, spilled to scratch files so that memory holds
        one proposal while they are written and a block of each while they are combined."""
        folder = self.layout.scratch / f"{job_id}-round-{round_}"
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

    def _advance(self, job_id: str, rec: JobRecord, cfg: JobConfig, art: dict, start: dict[str, torch.Tensor],
                 mean: dict[str, torch.Tensor] | None, why: str, updates: int) -> None:
        """Store the next global adapter (the server strategy's step from the round's `mean` of `updates`
        updates, or `start` again without one) and move the job, with `art`, to the next round in one
        compare-and-set transaction: when another coordinator closed the round first, nothing changes."""
        strategy = make_strategy(cfg.aggregator, **cfg.aggregator_params)
        if mean is None:
            new_global = start
        else:
            state = load_blob(self.blobs.open_path(art["strategy_state"])) if art.get("strategy_state") else {}
            new_global, new_state = strategy.step(start, mean, state)
            art["strategy_state"] = self.blobs.put_tensors(new_state) if new_state else None
        result = self.blobs.put_tensors(new_global)
        failpoints.hit("cloud.round.closing")  # the new adapter is stored; the round has not closed yet
        done = rec.round + 1 >= cfg.rounds
        if not self.state.close_round(job_id, rec.round, updates=updates, result_sha256=result, reason=why,
                                      artifacts_json=json.dumps(art), last=done, now=self._now()):
            log.info("job %s: round %d was closed by another coordinator", job_id, rec.round + 1)
            return
        log.info("job %s: round %d/%d closed (%s) with %s", job_id, rec.round + 1, cfg.rounds, why, strategy.name)
        self._runs.pop(job_id, None)
        if done:
            with self._scratch_lock:  # the scratch emulator's memory goes back before finalization loads the base
                if self._scratch.pop(job_id, None) is not None:
                    gc.collect()
        self.metrics.rounds_completed.labels(job_id).inc()
        for up in self.state.uploads(job_id, rec.round):  # uploads that never completed are moot now
            self._drop_upload(up.upload_id)
        if done and self.on_training_done:
            self.on_training_done(job_id)


def _half(adapter: dict[str, torch.Tensor]) -> bool:
    return any(v.dtype in (torch.bfloat16, torch.float16) for v in adapter.values())


def _upload_spec(cfg: JobConfig, art: dict) -> TensorSpec:
    """What a client of this job uploads: its method's tensors, or under secure aggregation one masked vector."""
    if cfg.secure_aggregation:
        return {vector.MASKED: ([vector.length(art["secagg_shapes"])], "uint64")}
    return {k: (shape, dtype) for k, (shape, dtype) in art["update_spec"].items()}


def round_weights(cfg: JobConfig, updates: list[UpdateRecord]) -> list[float]:
    """Each update's weight in the round's mean: its example count (bounded by the job's
    max_examples_per_client) or 1, then capped so that none passes max_weight_share of the round."""
    raw = [1.0 if cfg.weighting == "equal" else float(min(u.num_examples, cfg.max_examples_per_client)) for u in updates]
    return cap_weights(raw, cfg.max_weight_share)
