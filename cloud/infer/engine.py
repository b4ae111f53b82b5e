"""The decode loop: continuous batching over one base model and many jobs' adapters.

A request waits in a bounded queue until its adapter is resident (loaded on the loader thread, so a load
never stalls the batch), is prefilled on its own, then joins the running batch: one row of one KV cache,
left-padded to the batch's length. Every step runs the whole batch through the model once; the shared
blocks see all rows, each job's adapter blocks only its own (offsite.cloud.infer.routing). Rows leave as
they finish, are cancelled (the HTTP client went away) or pass their deadline; the cache then loses their
rows and any columns only they used. Greedy decoding gives what `generate` gives on the job's export.
"""
from __future__ import annotations

import inspect
import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn import functional as F
from transformers import DynamicCache

from offsite.cloud.infer.adapters import AdapterCache, JobAdapter
from offsite.cloud.infer.routing import Router
from offsite.errors import ConfigError, OffsiteError

log = logging.getLogger("offsite.cloud.infer")


class QueueFullError(OffsiteError):
    """The queue of waiting requests is at its bound."""


class DrainingError(OffsiteError):
    """The server is shutting down and takes no new requests."""


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 16
    temperature: float = 1.0     # 0: greedy
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 2 or not 0 < self.top_p <= 1:
            raise ConfigError(f"need 0 <= temperature <= 2 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")


@dataclass(frozen=True)
class Event:
    """What the engine tells a request: a token, or the end (`finish`: stop | length | cancelled |
    deadline | error, with `error` set for the last)."""
    token: int | None = None
    finish: str | None = None
    error: Exception | None = None


_ids = itertools.count()


@dataclass(eq=False)
class Request:
    model: str | None                  # a job id; None: the base model itself
    prompt: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]      # called on the engine's thread; must not block
    deadline: float = float("inf")     # time.monotonic() by which the request must be done
    id: int = field(default_factory=lambda: next(_ids))
    arrived: float = field(default_factory=time.monotonic)
    _cancelled: threading.Event = field(default_factory=threading.Event, repr=False)
    _adapter: Future | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Free the request's slot at the next step (its client went away, or a stop string matched)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass(eq=False)
class _Row:
    request: Request
    adapter: JobAdapter | None
    last: int                          # the token to feed next
    generated: int = 0                 # tokens handed on so far
    generator: torch.Generator | None = None


@dataclass
class EngineStats:
    steps: int = 0
    tokens_out: int = 0
    tokens_in: int = 0
    finished: dict[str, int] = field(default_factory=dict)


class Engine:
    """Serves one base model (loaded, prepared, in eval mode) and the jobs `adapters` loads for it."""

    def __init__(self, model, eos_ids: set[int], adapters: AdapterCache | None = None, max_batch: int = 32,
                 max_queue: int = 256, max_context: int | None = None):
        if max_batch < 1 or max_queue < 1:
            raise ConfigError(f"max_batch and max_queue must be >= 1, got {max_batch}, {max_queue}")
        self.model, self.eos, self.adapters = model, set(eos_ids), adapters
        self.router = Router(model)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_context = max_context or getattr(model.config, "max_position_embeddings", None) or 1 << 20
        self.device = model.get_input_embeddings().weight.device
        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._waiting: deque[Request] = deque()
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self._cv = threading.Condition()
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="offsite-adapter-loader")
        self._thread: threading.Thread | None = None
        self._draining = self._stopped = False
        self.stats = EngineStats()

    # --- the callers' side ------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request; QueueFullError when the queue is at its bound, DrainingError when shutting down."""
        if len(request.prompt) < 1:
            raise ConfigError("the prompt must have at least one token")
        if len(request.prompt) + request.sampling.max_tokens > self.max_context:
            raise ConfigError(f"prompt ({len(request.prompt)} tokens) + max_tokens ({request.sampling.max_tokens}) "
                              f"exceeds the model's context of {self.max_context} tokens")
        with self._cv:
            if self._draining:
                raise DrainingError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting, the most this server queues")
            if request.model is not None:
                request._adapter = self._loader.submit(self.adapters.acquire, request.model)
                request._adapter.add_done_callback(lambda _f: self._wake())
            self._waiting.append(request)
            self._cv.notify()

    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="offsite-engine", daemon=True)
        self._thread.start()
        return self

    def drain(self, timeout: float | None = None) -> None:
        """Take no new requests, finish the queued and running ones, then stop the loop."""
        with self._cv:
            self._draining = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self._loader.shutdown(wait=False, cancel_futures=True)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        return len(self._rows)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # --- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._rows and not self._ready() and not (self._draining and not self._waiting):
                    self._cv.wait(0.5)
                    self._expire_waiting()
                if self._draining and not self._waiting and not self._rows:
                    return
                self._expire_waiting()   # a waiting request whose client left frees its queue place now
                admitted = self._take_ready()
            for request in admitted:
                self._admit(request)
            if self._rows:
                try:
                    self._step()
                except Exception as e:  # a failing step fails its rows, not the server
                    log.exception("decode step failed")
                    for row in list(self._rows):
                        self._finish(row, "error", e)
                    self._drop(set(self._rows))

    def _ready(self) -> bool:
        return any(r._adapter is None or r._adapter.done() for r in self._waiting) and len(self._rows) < self.max_batch

    def _take_ready(self) -> list[Request]:
        taken, room = [], self.max_batch - len(self._rows)
        for request in list(self._waiting):
            if len(taken) >= room:
                break
            if request._adapter is None or request._adapter.done():
                self._waiting.remove(request)
                taken.append(request)
        return taken

    def _expire_waiting(self) -> None:
        now = time.monotonic()
        for request in [r for r in self._waiting if r.cancelled or r.deadline <= now]:
            self._waiting.remove(request)
            self._end_waiting(request, "cancelled" if request.cancelled else "deadline")

    def _end_waiting(self, request: Request, finish: str, error: Exception | None = None) -> None:
        if request._adapter is not None and request._adapter.done() and request._adapter.exception() is None:
            self.adapters.release(request._adapter.result())
        self._count(finish)
        request.emit(Event(finish=finish, error=error))

    def _admit(self, request: Request) -> None:
        if request.cancelled or request.deadline <= time.monotonic():
            return self._end_waiting(request, "cancelled" if request.cancelled else "deadline")
        adapter = None
        if request._adapter is not None:
            if request._adapter.exception() is not None:
                return self._end_waiting(request, "error", request._adapter.exception())
            adapter = request._adapter.result()
        virtual = adapter.virtual_tokens if adapter is not None else 0
        if virtual + len(request.prompt) + request.sampling.max_tokens > self.max_context:
            return self._end_waiting(request, "error", ConfigError(
                f"prompt ({len(request.prompt)} tokens) + the job's {virtual} virtual tokens + max_tokens "
                f"({request.sampling.max_tokens}) exceed the model's context of {self.max_context} tokens"))
        row = _Row(request, adapter, last=0, generator=_generator(request.sampling))
        try:  # a request that fails to start fails alone
            cache, mask, logits = self._prefill(request, adapter)
            token = self._sample(logits, [row])[0]
        except Exception as e:
            log.exception("prefill failed")
            return self._finish(row, "error", e)
        self.stats.tokens_in += len(request.prompt)
        if self._emit(row, token):
            self._merge(row, cache, mask)

    @torch.no_grad()
    def _prefill(self, request: Request, adapter: JobAdapter | None):
        ids = torch.tensor([request.prompt], device=self.device)
        virtual = adapter.virtual_tokens if adapter is not None else 0
        cache = DynamicCache()
        self.router.route([_routes(adapter)])
        inputs: dict = {"input_ids": ids}
        start = 0
        if adapter is not None and adapter.prefix:
            for layer, (k, v) in enumerate(adapter.prefix):
                cache.update(k, v, layer)
            start = virtual
        elif adapter is not None and adapter.prompt is not None:
            embeds = self.model.get_input_embeddings()(ids)
            inputs = {"inputs_embeds": torch.cat([adapter.prompt.to(embeds.dtype)[None], embeds], dim=1)}
        length = virtual + len(request.prompt)
        mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        positions = torch.arange(start, length, device=self.device)[None]
        logits = self._forward(inputs, mask, positions, cache)
        return cache, mask, logits

    @torch.no_grad()
    def _step(self) -> None:
        self.router.route([_routes(row.adapter) for row in self._rows])
        ids = torch.tensor([[row.last] for row in self._rows], device=self.device)
        positions = self._mask.sum(dim=1, keepdim=True)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._rows), 1)], dim=1)
        logits = self._forward({"input_ids": ids}, self._mask, positions, self._cache)
        self.stats.steps += 1
        tokens = self._sample(logits, self._rows)
        done = {row for row, token in zip(self._rows, tokens) if not self._emit(row, token)}
        if done:
            self._drop(done)

    def _forward(self, inputs: dict, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        extra = {"logits_to_keep": 1} if self._keep_last else {}
        out = self.model(**inputs, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, **extra)
        return out.logits[:, -1].float()

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        tokens = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            s = row.request.sampling
            if s.temperature > 0:
                probs = torch.softmax(logits[i] / s.temperature, dim=-1)
                if s.top_p < 1:  # nucleus: the smallest set of most likely tokens whose mass reaches top_p
                    sorted_p, order = probs.sort(descending=True)
                    outside = sorted_p.cumsum(0) - sorted_p >= s.top_p
                    probs = probs.scatter(0, order[outside], 0.0)
                tokens[i] = int(torch.multinomial(probs, 1, generator=row.generator))
        return tokens

    def _emit(self, row: _Row, token: int) -> bool:
        """Hand the token on; False when the row is finished."""
        request = row.request
        if request.cancelled:
            return self._finish(row, "cancelled")
        if token in self.eos:
            return self._finish(row, "stop")
        request.emit(Event(token=token))
        self.stats.tokens_out += 1
        row.generated += 1
        row.last = token
        if row.generated >= request.sampling.max_tokens:
            return self._finish(row, "length")
        if request.deadline <= time.monotonic():
            return self._finish(row, "deadline")
        return True

    def _finish(self, row: _Row, finish: str, error: Exception | None = None) -> bool:
        if row.adapter is not None:
            self.adapters.release(row.adapter)
        self._count(finish)
        row.request.emit(Event(finish=finish, error=error))
        return False

    def _count(self, finish: str) -> None:
        self.stats.finished[finish] = self.stats.finished.get(finish, 0) + 1

    # --- the batch's cache -------------------------------------------------------------------------
    def _merge(self, row: _Row, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Add a prefilled row: both caches left-padded to the longer one, then stacked."""
        if not self._rows:
            self._rows, self._cache, self._mask = [row], cache, mask
            return
        length = max(self._mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, length), _left_pad(theirs.keys, length)])
            mine.values = torch.cat([_left_pad(mine.values, length), _left_pad(theirs.values, length)])
        self._mask = torch.cat([F.pad(self._mask, (length - self._mask.shape[1], 0)), F.pad(mask, (length - mask.shape[1], 0))])
        self._rows.append(row)

    def _drop(self, done: set[_Row]) -> None:
        keep = [i for i, row in enumerate(self._rows) if row not in done]
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        first = int(mask.any(dim=0).long().argmax())   # columns that only departed rows used go too
        self._mask = mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[..., first:, :]
            layer.values = layer.values.index_select(0, index)[..., first:, :]


def _routes(adapter: JobAdapter | None) -> tuple[dict, dict, dict]:
    return (adapter.blocks, adapter.deltas, adapter.outer) if adapter is not None else ({}, {}, {})


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(t, (0, 0, length - t.shape[-2], 0))


def _generator(sampling: Sampling) -> torch.Generator | None:
    if sampling.temperature == 0:
        return None
    g = torch.Generator()
    g.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
    return g
