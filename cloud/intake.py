"""Updates coming in: header checks, the resumable upload (begin, append, finish), spool quotas and the
idle sweep, then verifying, opening and checking an update before it counts."""
from __future__ import annotations

import hashlib
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from offsite import failpoints
from offsite.cloud.job import Artifacts, Job, JobConfig
from offsite.cloud.state import ClientRecord, UpdateRecord, UploadRecord
from offsite.cloud.uploads import UploadSpool
from offsite.errors import (AlreadyExistsError, InvalidUpdateError, NotFoundError, PreconditionError, QuotaError, TooLargeError,
                            shown)
from offsite.files import sha256_bytes
from offsite.secagg import vector
from offsite.sealing import OVERHEAD, SealContext, open_sealed
from offsite.tensors import TensorSpec, check_matches, from_bytes, l2_norm, load_blob, payload_bounds

if TYPE_CHECKING:
    from offsite.cloud.coordinator import Coordinator

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HEADER_REFUSALS = {AlreadyExistsError: "duplicate", PreconditionError: "round_not_open", TooLargeError: "too_large",
                    QuotaError: "spool_quota", InvalidUpdateError: "bad_header"}  # a refused header's error -> its metric category
log = logging.getLogger("offsite.cloud")


@dataclass(frozen=True)
class UploadHeader:
    job_id: str
    round: int
    num_examples: int
    size: int
    sha256: str
    train_loss: float | None = None   # the client's report of its mean training loss (monitoring only)
    heldout_loss: float | None = None  # its global adapter's loss on its held-out data (jobs with report_heldout)


@dataclass(frozen=True)
class UploadSession:
    upload_id: str
    offset: int       # bytes held durably
    chunk_size: int


class Intake:
    def __init__(self, coordinator: Coordinator):
        self.c = coordinator
        self.spool = UploadSpool(coordinator.layout.uploads)
        self.lock = threading.Lock()  # one client's replace-then-open of an upload, and the quotas, at a time
        self._next_sweep = 0.0

    def check_header(self, client: ClientRecord, header: UploadHeader) -> Job:
        """Cheap checks before any bytes are read: right job and round, not yet accepted, size. Returns the job
        as read for them."""
        try:
            job = self.c.job(header.job_id)
        except NotFoundError:  # not counted: a job id the client made up must not become a metric label
            raise PreconditionError(f"no job {shown(header.job_id)} is accepting updates") from None
        cfg, state = job.config, self.c.state
        try:
            if state.has_update(header.job_id, header.round, client.client_id):
                # first: a client retrying after a crash ate its receipt learns its update counted, even if the
                # round has closed since
                raise AlreadyExistsError(f"an update from {client.client_id} for round {header.round + 1} was already accepted")
            if job.status != "running" or header.round != job.round:
                raise PreconditionError(f"job {header.job_id} is not accepting updates for round {header.round + 1} "
                                        f"(status {job.status}, open round {job.round + 1})")
            if client.client_id not in state.round(header.job_id, header.round).selected:
                raise PreconditionError(f"client {client.client_id} is not selected for round {header.round + 1} of job {header.job_id}")
            if header.size > cfg.max_update_bytes:
                raise TooLargeError(f"update of {header.size} bytes exceeds the job's limit of {cfg.max_update_bytes}")
            lo, hi = sealed_size(cfg, job.artifacts)
            if not lo <= header.size <= hi:
                raise InvalidUpdateError(f"an update of job {header.job_id} seals to {lo}..{hi} bytes, not {header.size}")
            if not 1 <= header.num_examples <= cfg.max_examples_per_client:
                raise InvalidUpdateError(f"num_examples must be in 1..{cfg.max_examples_per_client} (the job's "
                                         f"max_examples_per_client), got {header.num_examples}")
            if not _SHA256.match(header.sha256):
                raise InvalidUpdateError("the header's sha256 must be 64 lowercase hex digits")
            for name in ("train_loss", "heldout_loss"):
                loss = getattr(header, name)
                if loss is not None and not (math.isfinite(loss) and loss >= 0):
                    raise InvalidUpdateError(f"{name} must be a finite number >= 0")
        except (AlreadyExistsError, PreconditionError, TooLargeError, InvalidUpdateError) as e:
            self.c.metrics.rejected(header.job_id, _HEADER_REFUSALS[type(e)])
            raise
        return job

    # --- uploads --------------------------------------------------------------------------------
    def begin(self, client: ClientRecord, header: UploadHeader) -> UploadSession:
        """Open an upload, or find it again: its id depends only on the header, so a retry resumes it. A client
        has one open upload per job and round: a new header replaces the earlier one (a client that sealed
        again after a crash). Spool quotas, in total and per client, count announced sizes."""
        self.check_header(client, header)
        key = f"{header.job_id}|{header.round}|{client.client_id}|{header.num_examples}|{header.size}|{header.sha256}"
        upload_id = hashlib.sha256(key.encode()).hexdigest()[:32]
        with self.lock:
            mine = self.c.state.client_uploads(client.client_id)
            for old in mine:
                if old.upload_id != upload_id and (old.job_id, old.round) == (header.job_id, header.round):
                    self.drop(old.upload_id)
                    log.info("client %s: a new upload for round %d of job %s replaces its unfinished one", client.client_id,
                             header.round + 1, header.job_id)
            if upload_id not in {u.upload_id for u in mine}:
                self._check_quotas(client, header)
            self.spool.create(upload_id)  # before the record: the sweep never sees a record without its file's age
            self.c.state.open_upload(UploadRecord(upload_id, header.job_id, header.round, client.client_id,
                                                  header.num_examples, header.size, header.sha256, header.train_loss,
                                                  header.heldout_loss))
        return UploadSession(upload_id, self.spool.offset(upload_id), self.c.chunk_bytes)

    def _check_quotas(self, client: ClientRecord, header: UploadHeader) -> None:
        limits = self.c.limits
        mine, everyone = self.c.state.upload_bytes(client.client_id), self.c.state.upload_bytes()
        try:
            if mine + header.size > limits.spool_bytes_per_client:
                raise QuotaError(f"client {client.client_id} has {mine} bytes of uploads open; {header.size} more would pass "
                                 f"its spool quota of {limits.spool_bytes_per_client} (limit spool_bytes_per_client)")
            if everyone + header.size > limits.spool_bytes:
                raise QuotaError(f"the upload spool holds {everyone} bytes of open uploads; {header.size} more would pass "
                                 f"its quota of {limits.spool_bytes} (limit spool_bytes); try again later")
        except QuotaError:
            self.c.metrics.rejected(header.job_id, "spool_quota")
            raise

    def _open_upload(self, client: ClientRecord, upload_id: str) -> UploadRecord:
        try:
            up = self.c.state.upload(upload_id)
        except NotFoundError:
            up = None
        if up is None or up.client_id != client.client_id:  # another client's upload id reads as unknown
            raise NotFoundError(f"no open upload {upload_id[:16]!r} for client {client.client_id}; call BeginUpload")
        return up

    def append(self, client: ClientRecord, upload_id: str, offset: int, data: bytes) -> int:
        """Append one part durably; returns the new offset."""
        up = self._open_upload(client, upload_id)
        try:
            new_offset = self.spool.append(upload_id, offset, data, up.size)
        except InvalidUpdateError as e:  # more bytes than announced: this upload can never verify
            self.drop(upload_id)
            self.reject(up.job_id, up.round, client.client_id, str(e), "too_long")
            raise
        self.c.state.add_traffic(client.client_id, bytes_in=len(data))
        self.c.metrics.bytes_received.inc(len(data))
        return new_offset

    def finish(self, client: ClientRecord, upload_id: str) -> tuple[int, int] | None:
        """If every byte is in, verify and count the update (once) and drop the upload, whatever the verdict.
        Returns (round, updates in round), or None while bytes are missing."""
        up = self._open_upload(client, upload_id)
        if self.spool.offset(upload_id) < up.size:
            return None
        header = UploadHeader(up.job_id, up.round, up.num_examples, up.size, up.sha256, up.train_loss, up.heldout_loss)
        try:
            return self.submit(client, header, self.spool.read(upload_id))
        finally:
            self.drop(upload_id)

    def drop(self, upload_id: str) -> None:
        self.spool.discard(upload_id)
        self.c.state.close_upload(upload_id)

    def drop_job(self, job_id: str) -> None:
        """Drop every open upload of the job."""
        with self.lock:
            for up in self.c.state.open_uploads():
                if up.job_id == job_id:
                    self.drop(up.upload_id)

    def expire(self) -> int:
        """Drop open uploads (and stray spool files) with no new part for `upload_idle_s`; checked at most
        once a minute. Ages come from the spool files' times, on the machine's clock. Returns how many."""
        now, idle_s = time.time(), self.c.limits.upload_idle_s
        if now < self._next_sweep:
            return 0
        self._next_sweep = now + min(60.0, idle_s / 10)
        cutoff, dropped = now - idle_s, 0
        with self.lock:
            open_ = self.c.state.open_uploads()
            for up in open_:
                written = self.spool.last_written(up.upload_id)
                if written is None or written < cutoff:
                    self.drop(up.upload_id)
                    dropped += 1
            known = {u.upload_id for u in open_}
            for upload_id in self.spool.ids():  # a part that raced a replacement leaves a file with no upload
                written = self.spool.last_written(upload_id)
                if upload_id not in known and written is not None and written < cutoff:
                    self.spool.discard(upload_id)
        if dropped:
            log.info("dropped %d uploads with no new part for %g s", dropped, idle_s)
        return dropped

    # --- updates --------------------------------------------------------------------------------
    def reject(self, job_id: str, round_: int, client_id: str, why: str, reason: str) -> None:
        """Record why an update was refused (free text, in the state database) and count it by `reason`."""
        self.c.state.add_rejection(job_id, round_, client_id, why)
        self.c.metrics.rejected(job_id, reason)

    def submit(self, client: ClientRecord, header: UploadHeader, envelope: bytes) -> tuple[int, int]:
        """Verify, decrypt and check an update; store and count it once. Returns (round, updates in round)."""
        job = self.check_header(client, header)
        cfg, art, state = job.config, job.artifacts, self.c.state
        reason = "bad_digest"  # the check under way: what a refusal is counted as
        try:
            if len(envelope) != header.size or sha256_bytes(envelope) != header.sha256:
                raise InvalidUpdateError("upload bytes do not match the size and SHA-256 in the header")
            reason = "bad_seal"
            ctx = SealContext(header.job_id, header.round, client.client_id, art.skeleton_digest)
            plaintext = open_sealed(envelope, ctx, self.c.sealing_key, Ed25519PublicKey.from_public_bytes(client.signing_key))
            reason = "bad_tensors"
            tensors = from_bytes(plaintext)
            check_matches(tensors, upload_spec(cfg, art))  # a masked input's checks are then the protocol's
            if cfg.max_update_norm and not cfg.secure_aggregation:
                reason = "norm"
                start = load_blob(self.c.blobs.open_path(state.round(header.job_id, header.round).adapter_sha256))
                with self.c.proposals.proposal(job, start, tensors) as proposal:
                    _check_norm(proposal, start, cfg.max_update_norm)
        except InvalidUpdateError as e:
            self.reject(header.job_id, header.round, client.client_id, str(e), reason)
            raise
        record = UpdateRecord(header.job_id, header.round, client.client_id, header.num_examples, self.c.blobs.put(plaintext),
                              len(envelope), self.c.now(), header.train_loss,
                              header.heldout_loss if cfg.report_heldout else None)
        if cfg.secure_aggregation:
            with self.c.secure.lock:  # the masked input and its record together, in the run of the round it is for
                current = self.check_header(client, header)  # the round may have moved while we decrypted
                self.c.secure.run(current).masked(client.client_id, tensors[vector.MASKED].numpy())
                count = state.add_update(record)
        else:
            self.check_header(client, header)  # the round may have moved while we decrypted
            count = state.add_update(record)  # refused once the round is closed, even by another process
        if cfg.round_timeout_s:
            state.set_deadline(header.job_id, header.round, record.accepted_at + cfg.round_timeout_s)
        self.c.metrics.updates_accepted.labels(header.job_id).inc()
        log.info("job %s: round %d update from %s accepted (%d examples, %d bytes sealed)", header.job_id,
                 header.round + 1, client.client_id, header.num_examples, len(envelope))
        state.touch_client(client.client_id, f"update accepted for round {header.round + 1}")
        failpoints.hit("cloud.update.accepted")
        self.c.wake.set()  # the round worker closes the round if this update completes it
        return header.round, count


def _check_norm(update: dict[str, torch.Tensor], start: dict[str, torch.Tensor], bound: float) -> None:
    """The L2 norm of the change a client proposes, over every tensor, must stay within the job's bound."""
    norm = l2_norm(update[k].double() - start[k].double() for k in update)
    if norm > bound:
        raise InvalidUpdateError(f"update moves the adapter by L2 norm {norm:.4g}, above the job's bound {bound:g}")


def upload_spec(cfg: JobConfig, art: Artifacts) -> TensorSpec:
    """What a client of this job uploads: its method's tensors, or under secure aggregation one masked vector."""
    if cfg.secure_aggregation:
        return {vector.MASKED: ([vector.length(art.secagg_shapes)], "uint64")}
    return {k: (shape, dtype) for k, (shape, dtype) in art.update_spec.items()}


def sealed_size(cfg: JobConfig, art: Artifacts) -> tuple[int, int]:
    """The fewest and most bytes a valid sealed update of this job can have."""
    lo, hi = payload_bounds(upload_spec(cfg, art))
    return lo + OVERHEAD, hi + OVERHEAD
