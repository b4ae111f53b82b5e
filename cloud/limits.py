"""Every bound the coordinator puts on what one client, or anyone who reaches a port, can make it hold:
time, calls, connections, spool bytes. One record, set with `offsite cloud serve --limit NAME=VALUE`
and listed in docs/operations.md; the job-level bounds on updates live in the job file."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from offsite.errors import ConfigError

GIB = 1 << 30


@dataclass(frozen=True)
class Limits:
    # time: a call that stops moving is cut (DEADLINE_EXCEEDED), whatever it waits for
    request_timeout_s: float = 10.0       # a call's request message must arrive within this of the call's start
    part_timeout_s: float = 60.0          # an upload's next part must arrive within this of the last (~17 KiB/s at 1 MiB)
    send_timeout_s: float = 60.0          # a download's next chunk must be taken by the client within this
    handshake_timeout_s: float = 10.0     # a TLS handshake must finish within this
    # calls and connections
    calls_per_client: int = 8             # calls one enrolled client may have in flight; more: RESOURCE_EXHAUSTED
    downloads_per_client: int = 2         # of which downloads (a client fetches one blob at a time)
    streams_per_connection: int = 16      # HTTP/2 streams one connection may have open (mutual-TLS port)
    connections: int = 10_000             # open connections on the mutual-TLS port
    calls: int = 10_000                   # calls in flight on the mutual-TLS port
    enroll_connections: int = 1_000       # open connections on the enrollment port
    enroll_calls: int = 1_000             # calls in flight on the enrollment port
    enroll_streams_per_connection: int = 4
    enroll_connection_age_s: float = 120.0  # an enrollment connection is closed after this (enrolling takes one call)
    idle_connection_s: float = 300.0      # a connection with no call for this long is closed (clients reconnect)
    workers: int = 16                     # threads for blocking work (state database, tensors); calls wait for one
    # the upload spool (bytes of uploads in progress)
    spool_bytes: int = 64 * GIB           # all open uploads together; BeginUpload past it: RESOURCE_EXHAUSTED
    spool_bytes_per_client: int = 8 * GIB  # one client's open uploads together
    upload_idle_s: float = 3600.0         # an upload with no new part for this long is dropped (its bytes too)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"limit {f.name} must be a positive number, got {value!r}")

    @classmethod
    def parse(cls, items: list[str]) -> Limits:
        """From `NAME=VALUE` strings (the `--limit` flag); every other field keeps its default."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, int | float] = {}
        for item in items:
            name, sep, text = item.partition("=")
            if not sep or name not in fields:
                raise ConfigError(f"--limit takes NAME=VALUE with NAME one of {', '.join(fields)}; got {item[:80]!r}")
            kind = int if fields[name].type in ("int", int) else float
            try:
                values[name] = kind(text)
            except ValueError:
                raise ConfigError(f"--limit {name} needs {'an integer' if kind is int else 'a number'}, got {text[:40]!r}") from None
        return cls(**values)

    @classmethod
    def describe(cls) -> str:
        """NAME=DEFAULT for every limit, for --help."""
        return ", ".join(f"{f.name}={f.default:g}" if isinstance(f.default, float) else f"{f.name}={f.default}"
                         for f in dataclasses.fields(cls))
