"""The inference server's domain side, without HTTP: who may query which model, one engine per base model,
metrics. `offsite.cloud.infer.api` only translates HTTP to these calls."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from offsite.cloud import api_keys
from offsite.cloud.blobs import BlobStore
from offsite.cloud.infer.adapters import AdapterCache, build_adapter
from offsite.cloud.infer.catalog import Catalog, ServedJob, base_name
from offsite.cloud.infer.engine import Engine
from offsite.cloud.state import ApiKeyRecord, State
from offsite.emulator.build import load_base
from offsite.emulator.placement import Placement
from offsite.errors import AuthError, ConfigError, NotFoundError, PreconditionError


class ForbiddenError(AuthError):
    """The key is valid but does not open this model."""


@dataclass(frozen=True)
class ServeConfig:
    device: str = "cpu"
    adapter_memory: int | None = None     # bytes of job adapters held per base beside it (None: no limit)
    max_batch: int = 32                   # rows decoded together
    max_queue: int = 256                  # requests waiting for a row; more are refused (429)
    request_timeout: float = 300.0        # seconds from arrival until a request is ended
    max_tokens: int = 4096                # the most a request may ask for

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_queue < 1 or self.max_tokens < 1 or self.request_timeout <= 0:
            raise ConfigError("max_batch, max_queue and max_tokens must be >= 1 and request_timeout > 0")


@dataclass
class Served:
    """One base model in memory, its tokenizer, and the engine that serves it and its jobs."""
    name: str
    tokenizer: object
    engine: Engine
    adapters: AdapterCache


class InferenceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("offsite_infer_requests", "Requests answered, by model and HTTP status", ["model", "status"], registry=r)
        self.tokens_in = Counter("offsite_infer_prompt_tokens", "Prompt tokens taken", ["model"], registry=r)
        self.tokens_out = Counter("offsite_infer_completion_tokens", "Tokens generated", ["model"], registry=r)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("offsite_infer_time_to_first_token_seconds", "Arrival to first token", ["model"], buckets=buckets, registry=r)
        self.tpot = Histogram("offsite_infer_time_per_output_token_seconds", "Mean time between a request's tokens after the first",
                              ["model"], buckets=buckets, registry=r)
        self.queue = Gauge("offsite_infer_queue_depth", "Requests waiting for a batch row", ["base"], registry=r)
        self.batch = Gauge("offsite_infer_batch_rows", "Requests being decoded", ["base"], registry=r)
        self.resident = Gauge("offsite_infer_resident_adapters", "Job adapters held in memory", ["base"], registry=r)
        self.resident_bytes = Gauge("offsite_infer_resident_adapter_bytes", "Bytes of job adapters held", ["base"], registry=r)


@dataclass
class ModelStats:
    """What the status page shows per model (the histograms behind it are on /metrics)."""
    requests: int = 0
    errors: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0


class InferenceService:
    def __init__(self, state: State, blobs: BlobStore, config: ServeConfig = ServeConfig()):
        self.state, self.config = state, config
        self.catalog = Catalog(state, blobs)
        self.metrics = InferenceMetrics()
        self._served: dict[str, Served] = {}
        self.stats: dict[str, ModelStats] = {}
        self._lock = threading.Lock()
        self.draining = False

    def authenticate(self, secret: str) -> ApiKeyRecord:
        return api_keys.authenticate(self.state, secret)

    def models(self, key: ApiKeyRecord) -> list[tuple[str, int]]:
        """(model id, created) of every model the key may query: its finished jobs and their bases."""
        out: dict[str, int] = {}
        for job in self.catalog.jobs():
            if api_keys.allowed(key, job.job_id):
                out[job.job_id] = job.created
                out.setdefault(base_name(job.base), job.created)
        return sorted(out.items())

    def resolve(self, key: ApiKeyRecord, model_id: str) -> tuple[ServedJob | None, Served]:
        """The job (None: a base) and its base's engine, if the key opens it: NotFoundError for no such
        model, ForbiddenError for one the key does not open."""
        try:
            job, base = self.catalog.resolve(model_id)
        except PreconditionError:
            raise NotFoundError(f"no model {model_id!r}: that job has not finished") from None
        if job is not None and not api_keys.allowed(key, job.job_id):
            raise ForbiddenError(f"this API key may not query {model_id!r}")
        if job is None and not any(api_keys.allowed(key, j.job_id) for j in self.catalog.jobs() if j.base == base):
            raise ForbiddenError(f"this API key may not query {model_id!r}")
        return job, self.served(base)

    def served(self, base: str) -> Served:
        """The base's engine, loaded on first use (one copy of the base per process)."""
        with self._lock:
            if base not in self._served:
                self._served[base] = self._load(base)
            return self._served[base]

    def _load(self, base: str) -> Served:
        model, tokenizer = load_base(base, Placement(self.config.device))
        holder: dict = {}

        def load(job_id: str):
            job = self.catalog.job(job_id)
            router = holder["engine"].router
            return build_adapter(job_id, model, router, job.plan, job.method, self.catalog.adapter(job))

        adapters = AdapterCache(load, self.config.adapter_memory)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else []) | (
            {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
        engine = Engine(model, eos_ids, adapters, self.config.max_batch, self.config.max_queue)
        holder["engine"] = engine
        return Served(base_name(base), tokenizer, engine.start(), adapters)

    def load_all(self) -> list[str]:
        """Load every base a finished job was tuned from (at start, so that no request waits for it)."""
        bases = sorted({job.base for job in self.catalog.jobs()})
        for base in bases:
            self.served(base)
        return bases

    def deadline(self) -> float:
        return time.monotonic() + self.config.request_timeout

    def record(self, model: str, status: int, tokens_in: int, tokens_out: int, ttft: float | None) -> None:
        """One answered request (called on the event loop's thread only)."""
        stats = self.stats.setdefault(model, ModelStats())
        stats.requests += 1
        stats.errors += status >= 400
        stats.tokens_in += tokens_in
        stats.tokens_out += tokens_out
        if ttft is not None:
            stats.ttft_sum, stats.ttft_count = stats.ttft_sum + ttft, stats.ttft_count + 1

    def summary(self) -> dict:
        """This process's serving, as the coordinator's status page shows it."""
        return {"updated_at": time.time(), "draining": self.draining,
                "models": {m: {"requests": s.requests, "errors": s.errors, "tokens_in": s.tokens_in, "tokens_out": s.tokens_out,
                               "mean_ttft_s": s.ttft_sum / s.ttft_count if s.ttft_count else None}
                           for m, s in sorted(self.stats.items())},
                "bases": {served.name: {"queue": served.engine.queue_depth, "batch": served.engine.batch_size,
                                        "resident_adapters": served.adapters.resident(),
                                        "resident_bytes": served.adapters.resident_bytes}
                          for served in list(self._served.values())}}

    def observe(self) -> None:
        """Refresh the gauges (at scrape time)."""
        for served in list(self._served.values()):
            self.metrics.queue.labels(served.name).set(served.engine.queue_depth)
            self.metrics.batch.labels(served.name).set(served.engine.batch_size)
            self.metrics.resident.labels(served.name).set(len(served.adapters.resident()))
            self.metrics.resident_bytes.labels(served.name).set(served.adapters.resident_bytes)

    def drain(self, timeout: float | None = None) -> None:
        self.draining = True
        for served in list(self._served.values()):
            served.engine.drain(timeout)
