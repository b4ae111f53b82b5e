"""Jobs and rounds as plain objects: enrollment, tasks, blob access, update checks, round closing.

The gRPC servicer only translates messages to these calls; tests drive this class directly.
"""
from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from offsite.cloud.aggregate import FedAvg
from offsite.cloud.blobs import BlobStore
from offsite.cloud.identity import CertificateAuthority, StateLayout, hash_secret
from offsite.cloud.job import JobConfig
from offsite.cloud.state import ClientRecord, JobRecord, State, UpdateRecord
from offsite.emulator.build import build
from offsite.errors import (AlreadyExistsError, AuthError, InvalidRequestError, InvalidUpdateError, NotFoundError,
                            PreconditionError, TooLargeError)
from offsite.files import sha256_bytes
from offsite.sealing import SealContext, open_sealed, raw_public
from offsite.tensors import check_matches, from_bytes, spec_digest, spec_of, to_bytes

WAIT_S = 2.0
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


@dataclass(frozen=True)
class UploadHeader:
    job_id: str
    round: int
    num_examples: int
    size: int
    sha256: str


class Coordinator:
    def __init__(self, layout: StateLayout, state: State, blobs: BlobStore, sealing_key: X25519PrivateKey,
                 ca: CertificateAuthority, on_training_done: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time):
        self.layout, self.state, self.blobs = layout, state, blobs
        self._sealing_key, self._ca, self._now = sealing_key, ca, clock
        self.on_training_done = on_training_done  # called with the job id when its last round closes
        self._lock = threading.RLock()

    # --- jobs -----------------------------------------------------------------------------------
    def create_job(self, cfg: JobConfig) -> JobRecord:
        """Build the emulator bundle and skeleton, store them as blobs, and open round 0."""
        if any(j.job_id == cfg.job_id for j in self.state.jobs()):
            raise AlreadyExistsError(f"job {cfg.job_id} already exists; its bundle is left as it is")
        job_dir = self.layout.jobs / cfg.job_id
        result = build(cfg.base_model, cfg.emulator_config(), job_dir / "bundle")
        bundle_files = {p.name: self.blobs.put_file(p) for p in sorted(result.bundle_dir.iterdir()) if p.is_file()}
        skeleton_bytes = to_bytes(result.skeleton)
        spec = spec_of(result.skeleton)
        artifacts = {
            "manifest": bundle_files["offsite-manifest.json"],
            "bundle_files": bundle_files,
            "bundle_dir": str(result.bundle_dir),
            "plan": result.plan.to_dict(),
            "spec": spec,
            "skeleton_digest": spec_digest(spec),
            "adapters": [self.blobs.put(skeleton_bytes)],  # adapters[r] = global adapter that round r starts from
            "params": {"full": result.full_params, "emulator": result.emulator_params, "adapter": result.adapter_params},
        }
        self.state.add_job(cfg.job_id, cfg.to_json(), json.dumps(artifacts))
        return self.state.job(cfg.job_id)

    def job(self, job_id: str) -> tuple[JobRecord, JobConfig, dict]:
        rec = self.state.job(job_id)
        return rec, JobConfig.from_json(rec.config_json), json.loads(rec.artifacts_json)

    def active_job_id(self) -> str:
        running = [j for j in self.state.jobs() if j.status in ("running", "finalizing")]
        if not running:
            raise NotFoundError("the coordinator has no active job")
        return running[0].job_id

    # --- identity -------------------------------------------------------------------------------
    def enroll(self, token: str, signing_key: bytes, csr_pem: bytes) -> Enrollment:
        """Consume the token, register the signing key, and sign the client's TLS certificate."""
        try:
            Ed25519PublicKey.from_public_bytes(signing_key)
        except ValueError:
            raise InvalidRequestError("signing_public_key must be a raw 32-byte Ed25519 public key") from None
        csr = self._ca.load_csr(csr_pem)  # a malformed request, or no job to join, must not spend the token
        job_id = self.active_job_id()
        name = self.state.consume_token(hash_secret(token), self._now())
        if name is None:
            raise AuthError("enrollment token is unknown, already used or expired")
        client_id = f"{name}-{secrets.token_hex(4)}"
        certificate = self._ca.issue_client_certificate(csr, client_id)
        self.state.add_client(client_id, name, signing_key)
        log.info("client %s enrolled", client_id)
        return Enrollment(client_id, certificate, raw_public(self._sealing_key.public_key()), job_id)

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
        """Close every round whose deadline has passed with enough updates (the server calls this each second)."""
        for job in self.state.jobs():
            if job.status == "running":
                self._close_if_due(job.job_id)

    def _close_if_due(self, job_id: str) -> None:
        with self._lock:
            rec, cfg, _ = self.job(job_id)
            if rec.status != "running":
                return
            updates = self.state.updates(job_id, rec.round)
            if len(updates) >= cfg.clients_per_round:
                self._close_round(job_id, "all expected updates are in")
            elif (cfg.round_timeout_s and updates and len(updates) >= (cfg.min_clients or cfg.clients_per_round)
                  and self._now() >= min(u.accepted_at for u in updates) + cfg.round_timeout_s):
                self._close_round(job_id, f"deadline of {cfg.round_timeout_s:g} s passed with {len(updates)} updates")

    def task(self, client: ClientRecord, job_id: str) -> Task:
        self._close_if_due(job_id)
        rec, cfg, art = self.job(job_id)
        if rec.status != "running" or rec.round >= cfg.rounds:
            return Task("done", job_id, rec.round, cfg.rounds)
        if any(u.client_id == client.client_id for u in self.state.updates(job_id, rec.round)):
            return Task("wait", job_id, rec.round, cfg.rounds, retry_after_s=WAIT_S)
        return Task("train", job_id, rec.round, cfg.rounds, art["manifest"], art["adapters"][rec.round],
                    art["skeleton_digest"], cfg)

    def blob_path(self, client: ClientRecord, job_id: str, digest: str) -> Path:
        """Only the job's bundle files and global adapters are offered, never client updates."""
        _, _, art = self.job(job_id)
        if digest not in set(art["bundle_files"].values()) | set(art["adapters"]):
            raise NotFoundError(f"blob {digest[:16]}... is not offered by job {job_id}")
        return self.blobs.open_path(digest)

    def check_upload_header(self, client: ClientRecord, header: UploadHeader) -> None:
        """Cheap checks before any bytes are read: right job and round, not yet accepted, size."""
        try:
            self._close_if_due(header.job_id)
            rec, cfg, _ = self.job(header.job_id)
        except NotFoundError:
            raise PreconditionError(f"no job {header.job_id!r} is accepting updates") from None
        if rec.status != "running" or header.round != rec.round:
            raise PreconditionError(f"job {header.job_id} is not accepting updates for round {header.round} "
                                    f"(status {rec.status}, open round {rec.round})")
        if any(u.client_id == client.client_id for u in self.state.updates(header.job_id, header.round)):
            raise AlreadyExistsError(f"an update from {client.client_id} for round {header.round} was already accepted")
        if header.size > cfg.max_update_bytes:
            raise TooLargeError(f"update of {header.size} bytes exceeds the job's limit of {cfg.max_update_bytes}")
        if header.num_examples < 1:
            raise InvalidUpdateError("num_examples must be at least 1")

    def submit_update(self, client: ClientRecord, header: UploadHeader, envelope: bytes) -> tuple[int, int]:
        """Verify, decrypt and check an update; store and count it once. Returns (round, updates in round)."""
        self.check_upload_header(client, header)
        _, cfg, art = self.job(header.job_id)
        try:
            if len(envelope) != header.size or sha256_bytes(envelope) != header.sha256:
                raise InvalidUpdateError("upload bytes do not match the size and SHA-256 in the header")
            ctx = SealContext(header.job_id, header.round, client.client_id, art["skeleton_digest"])
            plaintext = open_sealed(envelope, ctx, self._sealing_key, Ed25519PublicKey.from_public_bytes(client.signing_key))
            check_matches(from_bytes(plaintext), {k: (s, d) for k, (s, d) in art["spec"].items()})
        except InvalidUpdateError as e:
            self.state.add_rejection(header.job_id, header.round, client.client_id, str(e))
            raise
        with self._lock:
            self.check_upload_header(client, header)  # the round may have moved while we decrypted
            digest = self.blobs.put(plaintext)
            count = self.state.add_update(UpdateRecord(header.job_id, header.round, client.client_id,
                                                       header.num_examples, digest, len(envelope), self._now()))
            log.info("job %s: round %d update from %s accepted (%d examples, %d bytes sealed)", header.job_id,
                     header.round + 1, client.client_id, header.num_examples, len(envelope))
            self._close_if_due(header.job_id)
        return header.round, count

    def _close_round(self, job_id: str, why: str) -> None:
        rec, cfg, art = self.job(job_id)
        agg = FedAvg()
        for u in self.state.updates(job_id, rec.round):
            agg.add(from_bytes(self.blobs.get(u.blob_sha256)), float(u.num_examples))
        skeleton = from_bytes(self.blobs.get(art["adapters"][0]))
        art["adapters"].append(self.blobs.put(to_bytes(agg.result(skeleton))))
        done = rec.round + 1 >= cfg.rounds
        log.info("job %s: round %d/%d closed (%s), %d updates averaged", job_id, rec.round + 1, cfg.rounds, why,
                 len(self.state.updates(job_id, rec.round)))
        self.state.update_job(job_id, round=rec.round + 1, artifacts_json=json.dumps(art),
                              status="finalizing" if done else "running")
        if done and self.on_training_done:
            self.on_training_done(job_id)
