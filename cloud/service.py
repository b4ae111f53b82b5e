"""The gRPC edge: translate messages to Coordinator calls and exceptions to status codes. No logic."""
from __future__ import annotations

import functools

import grpc

from offsite.cloud.coordinator import Coordinator, Task, UploadHeader
from offsite.errors import (AbortedError, AlreadyExistsError, AuthError, ConfigError, DataError, IntegrityError, InvalidRequestError,
                            InvalidUpdateError, NotFoundError, OffsiteError, OutOfRangeError, PreconditionError,
                            TooLargeError)
from offsite.protos.offsite.v1 import coordinator_pb2 as pb
from offsite.secagg.protocol import Reveal, SealedShares
from offsite.protos.offsite.v1 import coordinator_pb2_grpc as pb_grpc

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
_KINDS = {"wait": pb.Task.WAIT, "train": pb.Task.TRAIN, "done": pb.Task.DONE}


def status_of(error: OffsiteError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


def _edge(method):
    """Map OffsiteError subclasses to their status codes; anything else is INTERNAL (and not leaked)."""
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            result = method(self, request, context)
            if hasattr(result, "__next__"):  # server streaming: errors surface while iterating
                return _guard_stream(result, context)
            return result
        except OffsiteError as e:
            context.abort(status_of(e), str(e))
    return wrapper


def _guard_stream(gen, context):
    try:
        yield from gen
    except OffsiteError as e:
        context.abort(status_of(e), str(e))


def _peer_client_id(context) -> str | None:
    """The common name of the peer's client certificate, present only if our CA verified it."""
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"] or not auth.get("x509_common_name"):
        return None
    return auth["x509_common_name"][0].decode()


def task_message(task: Task) -> pb.Task:
    msg = pb.Task(kind=_KINDS[task.kind], job_id=task.job_id, round=task.round, total_rounds=task.total_rounds,
                  bundle_manifest_sha256=task.bundle_manifest_sha256, adapter_sha256=task.adapter_sha256,
                  skeleton_digest=task.skeleton_digest, retry_after_s=task.retry_after_s,
                  heartbeat_s=task.heartbeat_s)
    if task.config is not None:
        c = task.config
        m = c.method_config()
        method = pb.AdapterMethod(**m.to_dict())  # the same field names on both sides
        msg.training.CopyFrom(pb.TrainingSettings(epochs=c.epochs, lr=c.lr, batch_size=c.batch_size,
                                                  max_length=c.max_length, seed=c.seed, method=method, pack=c.pack,
                                                  grad_accum=c.grad_accum, gradient_checkpointing=c.gradient_checkpointing,
                                                  privacy=privacy_message(c)))
    return msg


def privacy_message(c) -> pb.Privacy:
    """Under secure aggregation the coordinator cannot clip or bound single updates: the client clips to
    the DP bound, or to the job's norm bound."""
    dp = c.dp_config()
    clip = (c.dp_clip or c.max_update_norm) if c.secure_aggregation else 0.0
    return pb.Privacy(secure_aggregation=c.secure_aggregation, clip=clip, equal_weights=dp.enabled)


def _roster_entry(advert, identity_key: bytes) -> pb.RosterEntry:
    return pb.RosterEntry(client_id=advert.client_id, cipher_public_key=advert.cipher_pk, mask_public_key=advert.mask_pk,
                          signature=advert.signature, identity_public_key=identity_key)


class CoordinatorService(pb_grpc.CoordinatorServicer):
    def __init__(self, coordinator: Coordinator):
        self.coordinator = coordinator

    @_edge
    def Enroll(self, request, context):
        e = self.coordinator.enroll(request.token, bytes(request.signing_public_key), bytes(request.csr_pem))
        return pb.EnrollResponse(client_id=e.client_id, certificate_pem=e.certificate_pem,
                                 coordinator_public_key=e.coordinator_public_key, job_id=e.job_id)

    @_edge
    def GetTask(self, request, context):
        client = self._client(context)
        return task_message(self.coordinator.task(client, request.job_id or self.coordinator.active_job_id()))

    def _client(self, context):
        return self.coordinator.authenticate(_peer_client_id(context))

    @_edge
    def GetBlobInfo(self, request, context):
        size, chunk_size, digests = self.coordinator.blob_info(self._client(context), self.coordinator.active_job_id(),
                                                               request.sha256)
        return pb.BlobInfo(sha256=request.sha256, size=size, chunk_size=chunk_size, chunk_sha256=digests)

    @_edge
    def Download(self, request, context):
        chunks = self.coordinator.download(self._client(context), self.coordinator.active_job_id(), request.sha256,
                                           request.first_chunk)
        return (pb.Chunk(index=i, data=data) for i, data in chunks)

    @_edge
    def BeginUpload(self, request, context):
        header = UploadHeader(request.job_id, request.round, request.num_examples, request.size, request.sha256,
                              request.train_loss if request.HasField("train_loss") else None)
        session = self.coordinator.begin_upload(self._client(context), header)
        return pb.UploadSession(upload_id=session.upload_id, offset=session.offset, chunk_size=session.chunk_size)

    @_edge
    def UploadChunks(self, request_iterator, context):
        client, upload_id, offset = self._client(context), None, 0
        for part in request_iterator:
            if upload_id is not None and part.upload_id != upload_id:
                raise InvalidUpdateError("every part of an UploadChunks call must name the same upload")
            upload_id = part.upload_id
            offset = self.coordinator.append_upload(client, upload_id, part.offset, part.data)
        if upload_id is None:
            raise InvalidUpdateError("UploadChunks needs at least one part")
        done = self.coordinator.finish_upload(client, upload_id)
        if done is None:
            return pb.UploadResult(upload_id=upload_id, offset=offset)
        return pb.UploadResult(upload_id=upload_id, offset=offset, accepted=True, round=done[0], updates_in_round=done[1])

    @_edge
    def SecAgg(self, request, context):
        client, which = self._client(context), request.WhichOneof("message")
        kwargs = {}
        if which == "advert":
            a = request.advert
            if len(a.cipher_public_key) != 32 or len(a.mask_public_key) != 32 or len(a.signature) != 64:
                raise InvalidRequestError("an advert needs two 32-byte X25519 keys and a 64-byte Ed25519 signature")
            kwargs["advert"] = (bytes(a.cipher_public_key), bytes(a.mask_public_key), bytes(a.signature))
        elif which == "shares":
            kwargs["shares"] = [SealedShares(s.sender, s.recipient, bytes(s.ciphertext)) for s in request.shares.sealed]
        elif which == "reveal":
            r = request.reveal
            kwargs["reveal"] = Reveal(client.client_id, {k: (v.index, bytes(v.value)) for k, v in r.seed_shares.items()},
                                      {k: (v.index, bytes(v.value)) for k, v in r.key_shares.items()})
        view = self.coordinator.secagg(client, request.job_id or self.coordinator.active_job_id(), request.round, **kwargs)
        return pb.SecAggState(stage=view["stage"], retry_after_s=0.0 if view["stage"] == 5 else 0.5,
                              roster=[_roster_entry(a, key) for a, key in view["roster"]], threshold=view["threshold"],
                              inbox=[pb.SealedShares(sender=s.sender, recipient=s.recipient, ciphertext=s.ciphertext)
                                     for s in view["inbox"]],
                              survivors=view["survivors"], length=view["length"], max_clients=view["max_clients"])

    @_edge
    def Heartbeat(self, request, context):
        open_ = self.coordinator.heartbeat(self._client(context), request.job_id or self.coordinator.active_job_id(),
                                           request.round, request.activity, request.progress)
        return pb.HeartbeatResponse(round_open=open_)
