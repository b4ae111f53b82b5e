"""Content-addressed blob store on disk: a blob's name is its SHA-256; writes are atomic."""
from __future__ import annotations

import re
from pathlib import Path

from offsite.errors import NotFoundError
from offsite.files import atomic_write, sha256_bytes

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class BlobStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

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
        return self.put(Path(src).read_bytes())

    def get(self, digest: str) -> bytes:
        return self.open_path(digest).read_bytes()

    def open_path(self, digest: str) -> Path:
        path = self.path(digest)
        if not path.is_file():
            raise NotFoundError(f"no blob {digest}")
        return path
