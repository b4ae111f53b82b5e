"""The round worker: the one place rounds close, on a thread of its own, off every request's path.

It runs `Coordinator.tick` each second (deadlines, free seats, idle uploads) and at once when
`coordinator.wake` is set (an update was accepted, a seat is free, a secure run has its sum). A call
that completes a round returns as soon as its update is stored; the aggregation, however long, never
holds a request, a gRPC worker thread or the health check.
"""
from __future__ import annotations

import logging
import threading

from offsite.cloud.coordinator import Coordinator

log = logging.getLogger("offsite.cloud")


class RoundWorker:
    def __init__(self, coordinator: Coordinator, interval_s: float = 1.0):
        self.coordinator, self.interval_s = coordinator, interval_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="round-worker", daemon=True)

    def start(self) -> RoundWorker:
        self._thread.start()
        return self

    def _loop(self) -> None:
        wake = self.coordinator.wake
        while True:
            wake.wait(self.interval_s)
            wake.clear()
            try:
                self.coordinator.tick()
            except Exception:  # a failed step is logged and tried again; the worker never dies of it
                log.exception("round worker: a step failed; trying again in %g s", self.interval_s)
            if self._stopping.is_set():
                return

    def stop(self, timeout: float | None = None) -> bool:
        """End after one last step (an update drained during shutdown may have completed a round); True
        when the worker ended within `timeout`."""
        self._stopping.set()
        self.coordinator.wake.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()
