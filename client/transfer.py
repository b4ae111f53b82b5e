"""Downloads verified against their SHA-256 as they land, and sealed uploads in 1 MiB chunks."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from offsite.emulator.bundle import MANIFEST, verify_bundle
from offsite.errors import IntegrityError
from offsite.files import atomic_write, sha256_file
from offsite.protos.offsite.v1 import coordinator_pb2 as pb
from offsite.transport import CHUNK_BYTES


def download_blob(stub, digest: str, dest: Path) -> Path:
    """Fetch blob `digest` into `dest` unless a verified copy is already there; resume a partial file."""
    if dest.is_file() and sha256_file(dest) == digest:
        return dest
    part = dest.with_name(dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.exists() else 0
    h = hashlib.sha256()
    if offset:
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    with open(part, "ab") as f:
        for chunk in stub.Download(pb.DownloadRequest(sha256=digest, offset=offset)):
            f.write(chunk.data)
            h.update(chunk.data)
        f.flush()
        os.fsync(f.fileno())
    if h.hexdigest() != digest:
        part.unlink()
        raise IntegrityError(f"download of {dest.name} does not match its SHA-256 {digest[:16]}...; discarded")
    os.replace(part, dest)
    return dest


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


def upload(stub, job_id: str, round_: int, num_examples: int, envelope: bytes) -> pb.UploadReceipt:
    header = pb.UploadHeader(job_id=job_id, round=round_, num_examples=num_examples, size=len(envelope),
                             sha256=hashlib.sha256(envelope).hexdigest())

    def messages():
        yield pb.UploadChunk(header=header)
        for i in range(0, len(envelope), CHUNK_BYTES):
            yield pb.UploadChunk(data=envelope[i : i + CHUNK_BYTES])

    return stub.Upload(messages())
