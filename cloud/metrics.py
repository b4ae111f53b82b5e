"""The coordinator's Prometheus metrics, in a registry of its own (not the process-wide default), so
tests and several coordinators in one process never share or clash on a metric.

Counters and the histogram count what this process did since it started; the gauges are read from
the state database at scrape time, so they are right after a restart too.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from offsite.cloud.state import JOB_TRANSITIONS, State

# Why an update was refused, as a label: a fixed, small set (free-text reasons stay in the state database).
REJECTION_REASONS = frozenset({
    "duplicate",       # this client's update for the round was already counted (also a retry after a lost reply)
    "round_not_open",  # the round closed (a late update) or is not the open one
    "too_large",       # the header announces more bytes than the job allows
    "spool_quota",     # the upload spool, or this client's share of it, is full
    "bad_header",      # example count, digest or reported loss malformed
    "too_long",        # more bytes arrived than the header announced
    "bad_digest",      # the bytes do not match the header's size and SHA-256
    "bad_seal",        # malformed envelope, signature or decryption failed
    "bad_tensors",     # not safetensors, or names, shapes, dtypes or values differ from the skeleton
    "norm",            # the change exceeds the job's L2 norm bound (one update, or a secure aggregate)
    "weight",          # a secure aggregate's summed weight is more than its clients may claim
    "secagg_aborted",  # a secure-aggregation run ended without a sum; its round closed without an update
})


# Why the gRPC edge ended a call itself (offsite.cloud.server, offsite.cloud.limits): a fixed set.
REFUSAL_REASONS = frozenset({
    "client_calls",     # the client already had calls_per_client calls (or downloads_per_client downloads) in flight
    "request_timeout",  # the request message did not arrive within request_timeout_s
    "part_timeout",     # an upload's next part did not arrive within part_timeout_s
    "send_timeout",     # the client took no download data for send_timeout_s
})


class _StateGauges(Collector):
    """Gauges computed from the state database on every scrape."""

    def __init__(self, state: State, connected_within_s: float, clock: Callable[[], float]):
        self._state, self._within, self._clock = state, connected_within_s, clock

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
        return (GaugeMetricFamily("offsite_clients_connected",
                                  f"Clients, not revoked, that called within the last {self._within:g} s"),
                GaugeMetricFamily("offsite_job_status", "1 for the job's status, 0 for the others", labels=["job", "status"]),
                GaugeMetricFamily("offsite_job_round", "Rounds the job has closed so far (its open round, counted "
                                  "from 1 as everywhere, is this plus 1)", labels=["job"]),
                GaugeMetricFamily("offsite_round_selected", "Clients selected for the running job's open round", labels=["job"]),
                GaugeMetricFamily("offsite_round_updates", "Updates counted in the running job's open round", labels=["job"]),
                GaugeMetricFamily("offsite_uploads_in_progress", "Uploads begun for the open round and not finished",
                                  labels=["job"]))

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families())  # names only: registering must not query the database

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = connected, status, rounds, selected, updates, uploads = self._families()
        since = self._clock() - self._within
        connected.add_metric([], sum(c.revoked_at is None and c.last_seen >= since for c in self._state.clients()))
        for job in self._state.jobs():
            for name in JOB_TRANSITIONS:
                status.add_metric([job.job_id, name], float(job.status == name))
            rounds.add_metric([job.job_id], job.round)
            uploads.add_metric([job.job_id], len(self._state.uploads(job.job_id, job.round)))
            if job.status == "running":
                selected.add_metric([job.job_id], len(self._state.round(job.job_id, job.round).selected))
                updates.add_metric([job.job_id], len(self._state.updates(job.job_id, job.round)))
        return iter(families)


class Metrics:
    """What the coordinator counts; `exposition` renders it for a scrape."""

    def __init__(self, state: State, connected_within_s: float = 60.0, clock: Callable[[], float] = time.time):
        self.registry = r = CollectorRegistry()
        self.rounds_completed = Counter("offsite_rounds_completed", "Rounds closed (with or without an update)",
                                        ["job"], registry=r)
        self.updates_accepted = Counter("offsite_updates_accepted", "Updates verified and counted", ["job"], registry=r)
        self.updates_rejected = Counter("offsite_updates_rejected", "Updates refused, by reason category",
                                        ["job", "reason"], registry=r)
        self.bytes_received = Counter("offsite_received_bytes", "Update bytes received from clients", registry=r)
        self.bytes_sent = Counter("offsite_sent_bytes", "Blob bytes (bundle, adapters) served to clients", registry=r)
        self.aggregation_seconds = Histogram("offsite_aggregation_seconds", "Time to aggregate a round's updates",
                                             buckets=(0.01, 0.1, 0.5, 1, 5, 15, 60, 300, 900), registry=r)
        self.calls_refused = Counter("offsite_calls_refused", "Calls the gRPC edge ended itself, by limit", ["reason"],
                                     registry=r)
        for reason in sorted(REFUSAL_REASONS):
            self.calls_refused.labels(reason)  # every series exists from the start, at 0
        self.call_seconds = Histogram("offsite_call_seconds", "Time the coordinator took over a gRPC call, from its "
                                      "start to its reply (for streams, to their end), by method", ["method"],
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1, 2.5, 5, 10, 30, 120),
                                      registry=r)
        self.calls_in_flight = Gauge("offsite_calls_in_flight", "gRPC calls the coordinator is serving now", registry=r)
        r.register(_StateGauges(state, connected_within_s, clock))

    def rejected(self, job_id: str, reason: str) -> None:
        if reason not in REJECTION_REASONS:  # a free-text label would make a new time series per message
            raise ValueError(f"unknown rejection reason category {reason!r}")
        self.updates_rejected.labels(job_id, reason).inc()

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The scrape body and its content type, in the format the scraper's Accept header asks for."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type
