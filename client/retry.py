"""Retries with exponential backoff for the errors a restart or a flaky link causes, and only those."""
from __future__ import annotations

import logging
import random
import time
from typing import Callable, TypeVar

import grpc

log = logging.getLogger("offsite.client")
T = TypeVar("T")
# RESOURCE_EXHAUSTED is the coordinator's limits saying "not now" (its upload spool is full, this client has
# its most calls in flight): an honest client's update always fits its job, so backing off is right.
TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED})


def with_retry(fn: Callable[[], T], what: str, budget_s: float, first_delay_s: float = 0.5, max_delay_s: float = 30.0,
               sleep: Callable[[float], None] = time.sleep, transient: frozenset = TRANSIENT) -> T:
    """Call `fn` until it succeeds, a non-transient error comes, or `budget_s` of retrying has passed."""
    deadline, delay = time.monotonic() + budget_s, first_delay_s
    while True:
        try:
            return fn()
        except grpc.RpcError as e:
            if e.code() not in transient or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: %s (%s); retrying in %.1f s", what, e.code().name, e.details(), delay)
            sleep(delay)
            delay = min(max_delay_s, delay * 2) * random.uniform(0.8, 1.2)  # jitter spreads a herd of clients
