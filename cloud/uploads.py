"""The upload spool: the bytes of uploads in progress, one append-only file each, fsynced per part.

An upload's durable offset is its file's length, so a coordinator killed mid-upload tells the client,
once restarted, exactly where to resume; the file's modification time is when its last part came, which
is what expiry goes by. Complete uploads are read once and removed.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from offsite.errors import InvalidUpdateError, NotFoundError, PreconditionError, shown

_ID = re.compile(r"^[0-9a-f]{32}$")


class UploadSpool:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, upload_id: str) -> Path:
        if not _ID.match(upload_id):
            raise NotFoundError(f"not an upload id: {shown(upload_id)}")
        return self.root / f"{upload_id}.part"

    def create(self, upload_id: str) -> None:
        """The upload's (empty) file, so that its age counts from now; an existing one is kept."""
        self._path(upload_id).touch(exist_ok=True)

    def last_written(self, upload_id: str) -> float | None:
        """When the upload's last part arrived (or it was created); None if it has no file."""
        try:
            return self._path(upload_id).stat().st_mtime
        except FileNotFoundError:
            return None

    def offset(self, upload_id: str) -> int:
        path = self._path(upload_id)
        return path.stat().st_size if path.exists() else 0

    def append(self, upload_id: str, offset: int, data: bytes, size: int) -> int:
        """Append `data` at `offset`, which must be the durable offset; return the new one."""
        have = self.offset(upload_id)
        if offset != have:
            raise PreconditionError(f"upload part at offset {offset}, but the coordinator holds {have} bytes; resume from there")
        if have + len(data) > size:
            raise InvalidUpdateError(f"upload is longer than the {size} bytes its header announced")
        with open(self._path(upload_id), "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return have + len(data)

    def ids(self) -> list[str]:
        """Every upload with a file here."""
        return [p.name.removesuffix(".part") for p in self.root.glob("*.part") if _ID.match(p.name.removesuffix(".part"))]

    def read(self, upload_id: str) -> bytes:
        return self._path(upload_id).read_bytes()

    def discard(self, upload_id: str) -> None:
        self._path(upload_id).unlink(missing_ok=True)
