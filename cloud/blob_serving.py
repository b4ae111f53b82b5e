"""Downloads: the blobs a client may fetch (its running jobs' bundle files, emulator patches and global
adapters), in chunks."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from offsite.cloud.state import ClientRecord
from offsite.errors import NotFoundError, OutOfRangeError

if TYPE_CHECKING:
    from offsite.cloud.coordinator import Coordinator


class BlobServing:
    def __init__(self, coordinator: Coordinator):
        self.c = coordinator

    def _offered(self, client: ClientRecord, digest: str) -> None:
        """Only the bundle files, emulator patch and global adapters of the running jobs on the client's
        roster are offered to it, never client updates."""
        for job in self.c.jobs_of(client):
            if job.status == "running" and (digest in job.artifacts.bundle_files.values()
                                            or digest == job.artifacts.emulator_patch
                                            or digest in self.c.state.global_adapters(job.job_id)):
                return
        raise NotFoundError(f"blob {digest[:16]}... is not offered by a running job of client {client.client_id}")

    def blob_info(self, client: ClientRecord, digest: str) -> tuple[int, int, list[str]]:
        """(size, chunk size, SHA-256 of each chunk) of an offered blob."""
        self._offered(client, digest)
        blobs, chunk = self.c.blobs, self.c.chunk_bytes
        return blobs.open_path(digest).stat().st_size, chunk, blobs.chunk_digests(digest, chunk)

    def download(self, client: ClientRecord, digest: str, first_chunk: int) -> Iterator[tuple[int, bytes]]:
        """The blob's chunks from `first_chunk` on, counted as bytes served to the client."""
        size, chunk, _ = self.blob_info(client, digest)
        if first_chunk * chunk >= max(size, 1):
            raise OutOfRangeError(f"chunk {first_chunk} is beyond the blob's {size} bytes")
        sent = 0
        try:
            for index, data in self.c.blobs.chunks(digest, chunk, first_chunk):
                yield index, data
                sent += len(data)
        finally:  # one state write per call, not per chunk: a synchronous commit per MiB halved throughput
            self.c.state.add_traffic(client.client_id, bytes_out=sent)
            self.c.metrics.bytes_sent.inc(sent)
