"""Resumable, verified transfer. Downloads arrive in chunks checked one by one against the blob's chunk
manifest, and a restarted client keeps every verified chunk it has. Uploads go to a server-side upload
whose id depends only on the sealed bytes, so a retry, or a restart with the same envelope, resumes it."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
from pathlib import Path

from offsite import chunks, failpoints
from offsite.emulator.bundle import MANIFEST, verify_bundle
from offsite.errors import IntegrityError
from offsite.files import atomic_write, sha256_file
from offsite.protos.offsite.v1 import coordinator_pb2 as pb
from offsite.protos.offsite.v1 import coordinator_pb2_grpc as pb_grpc

log = logging.getLogger("offsite.client")
PARTS_PER_CALL = 16  # an UploadChunks call carries at most this many chunks, then reports the durable offset


def coordinator_stub(channel) -> pb_grpc.CoordinatorStub:
    """The coordinator's stub, with a Download that reads each chunk by hand, as a view of the received bytes
    (offsite.chunks.decode), rather than through two copies in protobuf."""
    stub = pb_grpc.CoordinatorStub(channel)
    stub.Download = channel.unary_stream("/offsite.v1.Coordinator/Download", _registered_method=True,
                                         request_serializer=pb.DownloadRequest.SerializeToString,
                                         response_deserializer=chunks.decode)
    return stub


def _verified_prefix(part: Path, info: pb.BlobInfo) -> tuple[int, "hashlib._Hash"]:
    """How many leading chunks of a partial download match the manifest (the rest is cut off), and the
    whole-blob SHA-256 fed with them, so the final check needs no second pass over the file."""
    good, whole = 0, hashlib.sha256()
    if part.exists():
        with open(part, "rb") as f:
            for expected in info.chunk_sha256:
                data = f.read(info.chunk_size)
                if not data or hashlib.sha256(data).hexdigest() != expected:
                    break
                whole.update(data)
                good += 1
        os.truncate(part, min(good * info.chunk_size, info.size))
    return good, whole


class _ChunkWriter:
    """Writes received chunks, and feeds them to the whole-blob SHA-256, on a thread of its own, so that the
    receiving thread only receives (hashlib and file writes release the GIL). At most `DEPTH` chunks wait.

    Chunks are not hashed one by one as they land: TLS already authenticates every byte in transit, and the
    whole-blob SHA-256 against the digest the task named is the check that counts. The chunk manifest earns
    its keep where bytes sat on a disk: a partial file found on restart, and a download whose whole hash did
    not match (`download_blob` then keeps the chunks before the first bad one). Nor is the file synced: every
    reader verifies it first (`download_blob`, `verify_bundle`), so a file torn by a crash is fetched again,
    from its last good chunk."""

    DEPTH = 4

    def __init__(self, f, have: int, whole, name: str):
        self.f, self.have, self.whole, self.name = f, have, whole, name
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(self.DEPTH)
        self._thread = threading.Thread(target=self._run, name=f"download {name}", daemon=True)
        self._thread.start()

    def put(self, index: int, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        self._hand((index, data))

    def close(self) -> None:
        """Wait until every chunk put is written; raise what stopped the writer, if anything."""
        self._hand(None)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def _hand(self, item) -> None:
        while self._thread.is_alive():  # a writer that stopped takes nothing more
            try:
                return self._queue.put(item, timeout=0.2)
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                index, data = item
                if index != self.have:
                    raise IntegrityError(f"chunk {index} of {self.name} arrived where chunk {self.have} belongs; "
                                         f"kept the {self.have} chunks before it")
                self.f.write(data)  # unbuffered: a chunk is in the file (the page cache) once it is counted
                self.whole.update(data)
                self.have += 1
                failpoints.hit("client.download.chunk")
        except BaseException as e:  # the receiving thread raises it
            self.error = e


def download_blob(stub, digest: str, dest: Path) -> Path:
    """Fetch blob `digest` into `dest` unless a verified copy is there; fetch only the chunks it lacks.
    Receiving and checking run side by side (`_ChunkWriter`)."""
    if dest.is_file() and sha256_file(dest) == digest:
        return dest
    info = stub.GetBlobInfo(pb.BlobInfoRequest(sha256=digest))
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    (have, whole), total = _verified_prefix(part, info), len(info.chunk_sha256)
    if have:
        log.info("resuming %s: %d of %d chunks already here", dest.name, have, total)
    if have < total:
        with open(part, "ab", buffering=0) as f:
            writer = _ChunkWriter(f, have, whole, dest.name)
            try:  # a refused chunk ends the loop; the call, dropped, is cancelled
                for chunk in stub.Download(pb.DownloadRequest(sha256=digest, first_chunk=have)):
                    writer.put(chunk.index, chunk.data)
            finally:
                writer.close()
    if whole.hexdigest() != digest:
        raise _mismatch(part, info, digest, dest.name)
    os.replace(part, dest)
    return dest


def _mismatch(part: Path, info: pb.BlobInfo, digest: str, name: str) -> IntegrityError:
    """The error for a download whose whole hash is wrong, after cutting the file back to its chunks that
    match the manifest, so that the retry fetches only the rest (and a manifest at odds with the digest
    fails every time, naming no chunk)."""
    good, whole = _verified_prefix(part, info)
    if good == len(info.chunk_sha256) or whole.hexdigest() == digest:
        part.unlink()
        return IntegrityError(f"download of {name} does not match its SHA-256 {digest[:16]}... although every "
                              f"chunk matches the blob's chunk manifest; discarded")
    return IntegrityError(f"chunk {good} of {name} does not match the blob's chunk manifest; "
                          f"kept the {good} verified chunks before it")


def download_bundle(stub, manifest_digest: str, folder: Path) -> Path:
    """Fetch the manifest by digest, then every file it lists, then verify the whole bundle."""
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f".{folder.name}.manifest"
    download_blob(stub, manifest_digest, staging)
    manifest = json.loads(staging.read_text())
    for name, meta in manifest["files"].items():
        if "/" in name or name.startswith("."):
            raise IntegrityError(f"bundle manifest names an unsafe file {name!r}")
        download_blob(stub, meta["sha256"], folder / name)
    atomic_write(folder / MANIFEST, staging.read_bytes())
    verify_bundle(folder)
    return folder


def upload(stub, job_id: str, round_: int, num_examples: int, envelope: bytes | bytearray,
           train_loss: float | None = None, heldout_loss: float | None = None) -> pb.UploadResult:
    """Send a sealed update from wherever the coordinator's copy ends; return once it is accepted."""
    header = pb.UploadHeader(job_id=job_id, round=round_, num_examples=num_examples, size=len(envelope),
                             sha256=hashlib.sha256(envelope).hexdigest(), train_loss=train_loss, heldout_loss=heldout_loss)
    session = stub.BeginUpload(header)
    if session.offset:
        log.info("resuming upload at byte %d of %d", session.offset, len(envelope))
    offset, step, view = session.offset, session.chunk_size, memoryview(envelope)

    def parts(start: int):
        end = min(len(envelope), start + PARTS_PER_CALL * step)
        if start == end:  # every byte is already there: an empty part asks for the verdict
            yield pb.UploadPart(upload_id=session.upload_id, offset=start)
        for at in range(start, end, step):
            yield pb.UploadPart(upload_id=session.upload_id, offset=at, data=bytes(view[at : min(at + step, end)]))

    while True:
        result = stub.UploadChunks(parts(offset))
        if result.accepted:
            return result
        offset = result.offset
        failpoints.hit("client.upload.call")
