"""Plain handlers behind the gRPC edge (offsite.cloud.server): a checked request message and the caller's
verified client id in, a reply message out. No transport and no logic: the coordinator decides, and
`status_of` maps the errors it raises to status codes. Tests drive these without a network."""
from __future__ import annotations

from typing import Iterator

import grpc

from offsite import chunks
from offsite.cloud import serde
from offsite.cloud.coordinator import Coordinator
from offsite.cloud.state import ClientRecord
from offsite.errors import (AbortedError, AlreadyExistsError, AuthError, ConfigError, DataError, IntegrityError, InvalidRequestError,
                            InvalidUpdateError, NotFoundError, OffsiteError, OutOfRangeError, PreconditionError,
                            TooLargeError)
from offsite.protos.offsite.v1 import coordinator_pb2 as pb
from offsite.secagg.protocol import Reveal, SealedShares

STATUS = {
    AbortedError: grpc.StatusCode.ABORTED,
    AuthError: grpc.StatusCode.UNAUTHENTICATED,
    NotFoundError: grpc.StatusCode.NOT_FOUND,
    PreconditionError: grpc.StatusCode.FAILED_PRECONDITION,
    AlreadyExistsError: grpc.StatusCode.ALREADY_EXISTS,
    InvalidUpdateError: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    DataError: grpc.StatusCode.INVALID_ARGUMENT,
    TooLargeError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    IntegrityError: grpc.StatusCode.DATA_LOSS,
    OutOfRangeError: grpc.StatusCode.OUT_OF_RANGE,
}


def status_of(error: OffsiteError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


class CoordinatorService:
    """One method per RPC (streams split into their steps); `peer` is the common name of the caller's
    verified client certificate, None on the enrollment port."""

    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator

    def authenticate(self, peer: str | None) -> ClientRecord:
        return self.coordinator.authenticate(peer)

    @staticmethod
    def _job(job_id: str) -> str:
        if not job_id:
            raise InvalidRequestError("job_id is required: the job_id of the task this call is about")
        return job_id

    def Enroll(self, request: pb.EnrollRequest, peer: str | None) -> pb.EnrollResponse:
        e = self.coordinator.enroll(request.token, bytes(request.signing_public_key), bytes(request.csr_pem))
        return pb.EnrollResponse(client_id=e.client_id, certificate_pem=e.certificate_pem,
                                 coordinator_public_key=e.coordinator_public_key, job_id=e.job_id)

    def GetTask(self, request: pb.GetTaskRequest, peer: str | None) -> pb.Task:
        client = self.authenticate(peer)  # no job_id: the next task over every job the client is on the roster of
        task = self.coordinator.task(client, request.job_id) if request.job_id else self.coordinator.next_task(client)
        return serde.task_message(task)

    def GetBlobInfo(self, request: pb.BlobInfoRequest, peer: str | None) -> pb.BlobInfo:
        size, chunk_size, digests = self.coordinator.blob_info(self.authenticate(peer), request.sha256)
        return pb.BlobInfo(sha256=request.sha256, size=size, chunk_size=chunk_size, chunk_sha256=digests)

    def Download(self, request: pb.DownloadRequest, peer: str | None) -> Iterator[bytes]:
        """The chunks as serialized pb.Chunk messages, lazily: the checks run when the first one is asked for."""
        parts = self.coordinator.download(self.authenticate(peer), request.sha256, request.first_chunk)
        return (chunks.encode(i, data) for i, data in parts)

    def BeginUpload(self, request: pb.UploadHeader, peer: str | None) -> pb.UploadSession:
        session = self.coordinator.begin_upload(self.authenticate(peer), serde.upload_header(request))
        return pb.UploadSession(upload_id=session.upload_id, offset=session.offset, chunk_size=session.chunk_size)

    def UploadPart(self, part: pb.UploadPart, client: ClientRecord, upload_id: str | None) -> int:
        """Append one part of an UploadChunks call (every part names the call's first upload); the new offset."""
        if upload_id is not None and part.upload_id != upload_id:
            raise InvalidUpdateError("every part of an UploadChunks call must name the same upload")
        return self.coordinator.append_upload(client, part.upload_id, part.offset, part.data)

    def FinishUpload(self, client: ClientRecord, upload_id: str | None, offset: int) -> pb.UploadResult:
        if upload_id is None:
            raise InvalidUpdateError("UploadChunks needs at least one part")
        done = self.coordinator.finish_upload(client, upload_id)
        if done is None:
            return pb.UploadResult(upload_id=upload_id, offset=offset)
        return pb.UploadResult(upload_id=upload_id, offset=offset, accepted=True, round=done[0], updates_in_round=done[1])

    def SecAgg(self, request: pb.SecAggRequest, peer: str | None) -> pb.SecAggState:
        client, which = self.authenticate(peer), request.WhichOneof("message")
        kwargs = {}
        if which == "advert":
            a = request.advert
            kwargs["advert"] = (bytes(a.cipher_public_key), bytes(a.mask_public_key), bytes(a.signature))
        elif which == "shares":
            kwargs["shares"] = [SealedShares(s.sender, s.recipient, bytes(s.ciphertext)) for s in request.shares.sealed]
        elif which == "reveal":
            r = request.reveal
            kwargs["reveal"] = Reveal(client.client_id, {k: (v.index, bytes(v.value)) for k, v in r.seed_shares.items()},
                                      {k: (v.index, bytes(v.value)) for k, v in r.key_shares.items()})
        view = self.coordinator.secagg(client, self._job(request.job_id), request.round, **kwargs)
        return pb.SecAggState(stage=view["stage"], retry_after_s=0.0 if view["stage"] == 5 else 0.5,
                              roster=[serde.roster_entry(a, key) for a, key in view["roster"]], threshold=view["threshold"],
                              inbox=[pb.SealedShares(sender=s.sender, recipient=s.recipient, ciphertext=s.ciphertext)
                                     for s in view["inbox"]],
                              survivors=view["survivors"], length=view["length"], max_clients=view["max_clients"])

    def Heartbeat(self, request: pb.HeartbeatRequest, peer: str | None) -> pb.HeartbeatResponse:
        open_ = self.coordinator.heartbeat(self.authenticate(peer), self._job(request.job_id), request.round,
                                           request.activity, request.progress, request.failure)
        return pb.HeartbeatResponse(round_open=open_)
