"""Content-addressed blob store on disk: a blob's name is its SHA-256; writes are atomic.

Blobs are served in chunks, each with its own SHA-256, so a client verifies every chunk as it lands.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import threading
from typing import Iterator
from pathlib import Path

from offsite.errors import NotFoundError
from offsite.files import atomic_write, sha256_bytes, sha256_file

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class BlobStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._chunk_digests: dict[tuple[str, int], list[str]] = {}  # blobs never change: computed once
        self._lock = threading.Lock()

    def path(self, digest: str) -> Path:
        if not _DIGEST.match(digest):
            raise NotFoundError(f"not a SHA-256 digest: {digest[:80]!r}")
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        digest = sha256_bytes(data)
        path = self.path(digest)
        if not path.exists():
            atomic_write(path, data, mode=0o600)
        return digest

    def put_file(self, src: str | Path) -> str:
        """Store a file without reading it into memory: hashed piece by piece, then hard-linked in (one copy
        on disk: `src` must never change afterwards, as a job's bundle files do not), or copied where the
        store is on another file system. A link shares the file's mode: `src` becomes owner-only (0600),
        as every blob is."""
        src = Path(src)
        digest = sha256_file(src)
        path = self.path(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_name(f".{digest}.{os.getpid()}.{threading.get_ident()}.tmp")
            staging.unlink(missing_ok=True)
            try:
                os.link(src, staging)
            except OSError:
                shutil.copyfile(src, staging)
            os.chmod(staging, 0o600)
            os.replace(staging, path)
        return digest

    def put_tensors(self, tensors: dict) -> str:
        """Store tensors as a safetensors file written straight to disk (no bytes copy of them in memory)."""
        from offsite.tensors import save_tensors

        staging = self.root / f".tensors.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            save_tensors(tensors, staging)
            return self.put_file(staging)
        finally:
            staging.unlink(missing_ok=True)

    def get(self, digest: str) -> bytes:
        return self.open_path(digest).read_bytes()

    def open_path(self, digest: str) -> Path:
        path = self.path(digest)
        if not path.is_file():
            raise NotFoundError(f"no blob {digest}")
        return path

    def remove(self, digest: str) -> int:
        """Delete the blob if it is here; the bytes freed. Only for a blob no job names (see JobAdmin.delete_job)."""
        path = self.path(digest)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def chunk_digests(self, digest: str, chunk_size: int) -> list[str]:
        """The SHA-256 of each `chunk_size` piece of the blob, in order."""
        key = (digest, chunk_size)
        with self._lock:
            if key not in self._chunk_digests:
                self._chunk_digests[key] = [hashlib.sha256(c).hexdigest() for _, c in self.chunks(digest, chunk_size)]
            return self._chunk_digests[key]

    def chunks(self, digest: str, chunk_size: int, first: int = 0) -> Iterator[tuple[int, bytes]]:
        with open(self.open_path(digest), "rb") as f:
            f.seek(first * chunk_size)
            index = first
            while data := f.read(chunk_size):
                yield index, data
                index += 1
