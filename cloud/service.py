"""The gRPC edge: translate messages to Coordinator calls and exceptions to status codes. No logic."""
from __future__ import annotations

import functools

import grpc

from offsite.cloud.coordinator import Coordinator, Task, UploadHeader
from offsite.errors import (AlreadyExistsError, AuthError, ConfigError, DataError, IntegrityError, InvalidRequestError,
                            InvalidUpdateError, NotFoundError, OffsiteError, PreconditionError, TooLargeError)
from offsite.protos.offsite.v1 import coordinator_pb2 as pb
from offsite.protos.offsite.v1 import coordinator_pb2_grpc as pb_grpc
from offsite.transport import CHUNK_BYTES

STATUS = {
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
                  skeleton_digest=task.skeleton_digest, retry_after_s=task.retry_after_s)
    if task.config is not None:
        c = task.config
        msg.training.CopyFrom(pb.TrainingSettings(epochs=c.epochs, lr=c.lr, batch_size=c.batch_size,
                                                  max_length=c.max_length, seed=c.seed))
    return msg


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
        client = self.coordinator.authenticate(_peer_client_id(context))
        return task_message(self.coordinator.task(client, request.job_id or self.coordinator.active_job_id()))

    @_edge
    def Download(self, request, context):
        client = self.coordinator.authenticate(_peer_client_id(context))
        path = self.coordinator.blob_path(client, self.coordinator.active_job_id(), request.sha256)
        return self._chunks(path, request.offset, context)

    @staticmethod
    def _chunks(path, offset, context):
        size = path.stat().st_size
        if offset > size:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {offset} is beyond the blob's {size} bytes")
        with open(path, "rb") as f:
            f.seek(offset)
            while data := f.read(CHUNK_BYTES):
                yield pb.Chunk(data=data, offset=offset, total_size=size)
                offset += len(data)

    @_edge
    def Upload(self, request_iterator, context):
        client = self.coordinator.authenticate(_peer_client_id(context))
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidUpdateError("an upload must start with its header")
        h = first.header
        header = UploadHeader(h.job_id, h.round, h.num_examples, h.size, h.sha256)
        self.coordinator.check_upload_header(client, header)
        parts, received = [], 0
        for msg in request_iterator:
            if msg.WhichOneof("part") != "data":
                raise InvalidUpdateError("only data chunks may follow the header")
            received += len(msg.data)
            if received > header.size:
                raise InvalidUpdateError(f"upload is longer than the {header.size} bytes its header announced")
            parts.append(msg.data)
        round_, count = self.coordinator.submit_update(client, header, b"".join(parts))
        return pb.UploadReceipt(round=round_, updates_in_round=count)
