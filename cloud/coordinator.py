"""Jobs and rounds as plain objects: the coordinator's one face over its parts, each a module of its own:

- offsite.cloud.job_admin: making, cancelling, re-finalizing and deleting jobs
- offsite.cloud.enrollment: enrollment and the client behind each call
- offsite.cloud.tasks: what a client does next (train, wait, done)
- offsite.cloud.blob_serving: the bundle files and global adapters a client may download
- offsite.cloud.intake: uploads and the checks an update passes before it counts
- offsite.cloud.secure_runs: secure aggregation's runs, in memory
- offsite.cloud.round_control: the round worker's tick: seats, round closing, aggregation
- offsite.cloud.proposals: the global adapter an update proposes (peft merges on a scratch emulator)
- offsite.cloud.tracking: a tracked job's settings, rounds and evaluation as TensorBoard event files

The gRPC servicer only translates messages to these calls; tests drive this class directly.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from offsite.cloud.blob_serving import BlobServing
from offsite.cloud.blobs import BlobStore
from offsite.cloud.enrollment import Enrollment, Enrollments
from offsite.cloud.identity import CertificateAuthority, StateLayout, load_sealing_key
from offsite.cloud.intake import Intake, UploadHeader, UploadSession
from offsite.cloud.job import Job, JobConfig
from offsite.cloud.job_admin import Deleted, JobAdmin
from offsite.cloud.limits import Limits
from offsite.cloud.metrics import Metrics
from offsite.cloud.proposals import Proposals
from offsite.cloud.round_control import RoundControl
from offsite.cloud.secure_runs import SecureRuns
from offsite.cloud.state import ClientRecord, JobRecord, State
from offsite.cloud.tasks import Task, Tasks
from offsite.cloud.tracking import Tracking
from offsite.secagg.protocol import Reveal, SealedShares
from offsite.transport import CHUNK_BYTES


class Coordinator:
    """Owns what the parts share (state, blobs, keys, clock, metrics, limits, the `wake` event) and hands
    each call to the part it concerns."""

    def __init__(self, layout: StateLayout, state: State, blobs: BlobStore, sealing_key: X25519PrivateKey,
                 ca: CertificateAuthority, on_training_done: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.time, chunk_bytes: int = CHUNK_BYTES, metrics: Metrics | None = None,
                 limits: Limits | None = None):
        self.layout, self.state, self.blobs = layout, state, blobs
        self.metrics = metrics or Metrics(state)
        self.sealing_key, self.ca, self.now = sealing_key, ca, clock
        self.chunk_bytes = chunk_bytes
        self.limits = limits or Limits()
        self.on_training_done = on_training_done  # called with the job id when its last round closes
        self.wake = threading.Event()      # set when a round may be due: an update accepted, a seat free; the worker ticks
        self.proposals = Proposals()
        self.tracking = Tracking()
        self.secure = SecureRuns(self)
        self.intake = Intake(self)
        self.rounds = RoundControl(self)
        self.tasks = Tasks(self)
        self.enrollments = Enrollments(self)
        self.serving = BlobServing(self)
        self.admin = JobAdmin(self)

    @classmethod
    def open(cls, root: str | Path, **options) -> Coordinator:
        """The coordinator of the state folder `root` (made by `offsite cloud init`); `options` as for __init__."""
        layout = StateLayout(Path(root))
        return cls(layout, layout.open_state(), BlobStore(layout.blobs), load_sealing_key(layout), CertificateAuthority.load(layout),
                   **options)

    # --- jobs -----------------------------------------------------------------------------------
    def job(self, job_id: str) -> Job:
        return Job.from_record(self.state.job(job_id))

    def jobs_of(self, client: ClientRecord) -> list[Job]:
        """The jobs whose roster holds the client, oldest first."""
        return [job for job in map(Job.from_record, self.state.jobs()) if job.config.on_roster(client.name)]

    def create_job(self, cfg: JobConfig) -> JobRecord:
        return self.admin.create_job(cfg)

    def cancel_job(self, job_id: str) -> None:
        self.admin.cancel_job(job_id)

    def retry_finalization(self, job_id: str) -> None:
        self.admin.retry_finalization(job_id)

    def delete_job(self, job_id: str) -> Deleted:
        return self.admin.delete_job(job_id)

    # --- clients --------------------------------------------------------------------------------
    def enroll(self, token: str, signing_key: bytes, csr_pem: bytes) -> Enrollment:
        return self.enrollments.enroll(token, signing_key, csr_pem)

    def authenticate(self, client_id: str | None) -> ClientRecord:
        return self.enrollments.authenticate(client_id)

    def next_task(self, client: ClientRecord) -> Task:
        return self.tasks.next_task(client)

    def task(self, client: ClientRecord, job_id: str) -> Task:
        return self.tasks.task(client, job_id)

    def heartbeat(self, client: ClientRecord, job_id: str, round_: int, activity: str, progress: float,
                  failure: str = "") -> bool:
        return self.tasks.heartbeat(client, job_id, round_, activity, progress, failure)

    # --- downloads ------------------------------------------------------------------------------
    def blob_info(self, client: ClientRecord, digest: str) -> tuple[int, int, list[str]]:
        return self.serving.blob_info(client, digest)

    def download(self, client: ClientRecord, digest: str, first_chunk: int) -> Iterator[tuple[int, bytes]]:
        return self.serving.download(client, digest, first_chunk)

    # --- uploads --------------------------------------------------------------------------------
    def begin_upload(self, client: ClientRecord, header: UploadHeader) -> UploadSession:
        return self.intake.begin(client, header)

    def append_upload(self, client: ClientRecord, upload_id: str, offset: int, data: bytes) -> int:
        return self.intake.append(client, upload_id, offset, data)

    def finish_upload(self, client: ClientRecord, upload_id: str) -> tuple[int, int] | None:
        return self.intake.finish(client, upload_id)

    def submit_update(self, client: ClientRecord, header: UploadHeader, envelope: bytes) -> tuple[int, int]:
        return self.intake.submit(client, header, envelope)

    def expire_uploads(self) -> int:
        return self.intake.expire()

    # --- rounds ---------------------------------------------------------------------------------
    def tick(self) -> None:
        self.rounds.tick()

    def secagg(self, client: ClientRecord, job_id: str, round_: int, advert: tuple[bytes, bytes, bytes] | None = None,
               shares: list[SealedShares] | None = None, reveal: Reveal | None = None) -> dict:
        return self.secure.secagg(client, job_id, round_, advert, shares, reveal)
