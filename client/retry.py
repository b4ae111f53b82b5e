"""Retries with exponential backoff for the errors a restart or a flaky link causes, and only those."""
from __future__ import annotations

import logging
import random
import time
from typing import Callable, TypeVar

import grpc

from offsite.errors import ConfigError

log = logging.getLogger("offsite.client")
T = TypeVar("T")
# RESOURCE_EXHAUSTED is the coordinator's limits saying "not now" (its upload spool is full, this client has
# its most calls in flight): an honest client's update always fits its job, so backing off is right.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED})


class HandshakeFailed(ConfigError):
    """The TLS handshake with the coordinator failed: a wrong CA, a workdir enrolled with another coordinator, or
    an address that is not the coordinator's gRPC port. Retrying cannot help; the caller names the files."""


def handshake_failed(e: grpc.RpcError) -> bool:
    return e.code() == grpc.StatusCode.UNAVAILABLE and "handshake failed" in (e.details() or "").lower()


def with_retry(fn: Callable[[], T], what: str, budget_s: float, first_delay_s: float = 0.5, max_delay_s: float = 30.0,
               sleep: Callable[[float], None] = time.sleep, transient: frozenset = TRANSIENT) -> T:
    """Call `fn` until it succeeds, a non-transient error comes, or `budget_s` of retrying has passed. A failed TLS
    handshake is HandshakeFailed at once: a configuration problem, not a network blip."""
    deadline, delay = time.monotonic() + budget_s, first_delay_s
    while True:
        try:
            return fn()
        except grpc.RpcError as e:
            if handshake_failed(e):
                raise HandshakeFailed(f"{what}: {e.details()}") from None
            if e.code() not in transient or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: %s (%s); retrying in %.1f s", what, e.code().name, e.details(), delay)
            sleep(delay)
            delay = min(max_delay_s, delay * 2) * random.uniform(0.8, 1.2)  # jitter spreads a herd of clients
