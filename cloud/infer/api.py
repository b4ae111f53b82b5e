"""The OpenAI-compatible HTTP API (FastAPI on uvicorn, TLS with the coordinator's server certificate).

GET /v1/models, POST /v1/completions and /v1/chat/completions (with `stream: true` as server-sent events),
errors in OpenAI's shape: 400 a bad parameter (named in `param`), 401 an unknown, revoked or expired key,
403 a model this key does not open, 404 no such model, 413 a body over the limit, 429 the queue is full,
503 draining or no memory for the adapter, 504 past the request's deadline. GET /healthz and /metrics
need no key. Only translation lives here; the decisions are InferenceService's.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Request as HttpRequest
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator

from offsite.cloud.infer.adapters import AdapterMemoryError
from offsite.cloud.infer.engine import DrainingError, Event, QueueFullError, Request, Sampling
from offsite.cloud.infer.service import ForbiddenError, InferenceService
from offsite.cloud.infer.text import TextStream
from offsite import render
from offsite.errors import AuthError, ConfigError, DataError, NotFoundError, OffsiteError
from offsite.files import atomic_write

log = logging.getLogger("offsite.cloud.infer")
MAX_BODY_BYTES = 1 << 20        # a request body larger than this is refused before it is parsed
MAX_TEXT_CHARS = 400_000        # one prompt or message
POLL_S = 0.5                    # how often a waiting non-streaming request checks that its client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _mapped(e: Exception) -> ApiError:
    """Domain errors -> HTTP statuses, in one place."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, ForbiddenError):
        return ApiError(403, str(e), "permission_error", "model", "model_not_allowed")
    if isinstance(e, AuthError):
        return ApiError(401, str(e), "authentication_error", None, "invalid_api_key")
    if isinstance(e, NotFoundError):
        return ApiError(404, str(e), "invalid_request_error", "model", "model_not_found")
    if isinstance(e, QueueFullError):
        return ApiError(429, f"{e}; retry later", "rate_limit_error", None, "queue_full")
    if isinstance(e, DrainingError):
        return ApiError(503, "the server is shutting down; retry on another replica", "server_error", None, "draining")
    if isinstance(e, AdapterMemoryError):
        return ApiError(503, str(e), "server_error", None, "adapter_memory_full")
    if isinstance(e, ConfigError):
        return ApiError(400, str(e))
    return ApiError(500, "internal error", "server_error")


# --- request bodies ----------------------------------------------------------------------------------
class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: dict[Literal["include_usage"], bool] | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(len(s) > 256 for s in stops):
            raise ValueError("at most 4 stop strings of at most 256 characters")
        return stops

    def sampling(self, max_tokens: int) -> Sampling:
        return Sampling(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed)


class CompletionBody(_Common):
    prompt: str | list[str] = Field(max_length=MAX_TEXT_CHARS)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("give one prompt (a string, or a list of one string)")
            v = v[0]
        if len(v) > MAX_TEXT_CHARS:
            raise ValueError(f"a prompt has at most {MAX_TEXT_CHARS} characters")
        return v


class _Part(BaseModel):
    type: Literal["text"]
    text: str = Field(max_length=MAX_TEXT_CHARS)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Part] = Field(max_length=MAX_TEXT_CHARS)
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1)


# --- the app -----------------------------------------------------------------------------------------
SUMMARY_S = 5.0   # how often the summary for the coordinator's status page is written


def create_app(service: InferenceService, summary_path: Path | None = None) -> FastAPI:
    """The app; with `summary_path`, the service's summary is written there every SUMMARY_S seconds (from
    the event loop, the thread that updates it) for the coordinator's status page, and removed at exit."""

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if summary_path is None:
            yield
            return

        async def write_summaries() -> None:
            while True:
                atomic_write(summary_path, json.dumps(service.summary()).encode())
                await asyncio.sleep(SUMMARY_S)
        task = asyncio.create_task(write_summaries())
        try:
            yield
        finally:
            task.cancel()
            summary_path.unlink(missing_ok=True)

    app = FastAPI(title="offsite inference", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(OffsiteError)
    async def _domain_error(_request, e: OffsiteError):
        mapped = _mapped(e)
        return JSONResponse(mapped.body(), status_code=mapped.status)

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(ApiError(500, "internal error", "server_error").body(), status_code=500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid')}" if param else str(first.get("msg", "invalid request body"))
        return JSONResponse(ApiError(400, message, param=param).body(), status_code=400)

    async def key(request: HttpRequest):
        header = request.headers.get("authorization", "")
        scheme, _, secret = header.partition(" ")
        if scheme.lower() != "bearer" or not secret:
            raise ApiError(401, "no API key: send Authorization: Bearer <key>", "authentication_error", None, "invalid_api_key")
        try:
            return await run_in_threadpool(service.authenticate, secret.strip())
        except AuthError as e:
            raise _mapped(e) from None

    @app.get("/healthz")
    async def healthz():
        return PlainTextResponse("draining\n" if service.draining else "ok\n", status_code=503 if service.draining else 200)

    @app.get("/metrics")
    async def metrics():
        service.observe()
        return PlainTextResponse(generate_latest(service.metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(record=Depends(key)):
        listed = await run_in_threadpool(service.models, record)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "offsite"}
                                           for m, created in listed]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HttpRequest, record=Depends(key)):
        job, served = await _resolve(record, body.model)
        ids = render.prompt_ids(served.tokenizer, body.prompt)  # exactly the prefix the job trained on
        return await _generate(http, served, job, body, ids, body.max_tokens or 16, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HttpRequest, record=Depends(key)):
        job, served = await _resolve(record, body.model)
        template = job.chat_template if job is not None else None
        if not render.has_chat_template(served.tokenizer, template):
            raise ApiError(400, f"model {body.model!r} has no chat template: use /v1/completions", param="messages")
        try:  # the conversation as the job's chat examples were rendered for training, up to the assistant's turn
            ids = render.chat_prompt_ids(served.tokenizer, [{"role": m.role, "content": m.text()} for m in body.messages],
                                         template)
        except DataError as e:
            raise ApiError(400, str(e), param="messages") from None
        limit = body.max_completion_tokens or body.max_tokens or service.config.max_tokens
        return await _generate(http, served, job, body, list(ids), limit, chat=True)

    async def _resolve(record, model_id: str):
        try:
            return await run_in_threadpool(service.resolve, record, model_id)
        except OffsiteError as e:
            service.metrics.requests.labels(model_id if not isinstance(e, NotFoundError) else "", _mapped(e).status).inc()
            raise

    async def _generate(http: HttpRequest, served, job, body: _Common, ids: list[int], max_tokens: int, chat: bool):
        model = body.model
        if max_tokens > service.config.max_tokens:
            raise ApiError(400, f"max_tokens may be at most {service.config.max_tokens}", param="max_tokens")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:   # the event loop is gone (shutting down): nobody is listening
                pass

        request = Request(job.job_id if job else None, ids, body.sampling(max_tokens), emit, service.deadline())
        try:
            if service.draining:
                raise DrainingError("the server is shutting down")
            served.engine.submit(request)
        except OffsiteError as e:
            service.metrics.requests.labels(model, _mapped(e).status).inc()
            raise
        created, rid = int(time.time()), ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        text = TextStream(served.tokenizer, tuple(body.stop or ()))
        timing = _Timing(request.arrived)

        async def next_event() -> Event | None:
            """The engine's next event, or None if the client went away meanwhile."""
            while True:
                try:
                    return await asyncio.wait_for(events.get(), POLL_S)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        request.cancel()
                        return None

        async def tokens():
            """(text delta, finish reason or None) as the engine produces them."""
            while True:
                event = await next_event()
                if event is None:
                    return
                if event.token is not None:
                    timing.token()
                    delta = text.add(event.token)
                    if text.stopped:
                        request.cancel()
                        yield delta, "stop"
                        return
                    if delta:
                        yield delta, None
                    continue
                if event.finish in ("stop", "length"):
                    yield text.finish(), event.finish
                    return
                if event.finish == "deadline":
                    raise ApiError(504, f"the request passed its deadline of {service.config.request_timeout:g} s",
                                   "timeout_error", None, "deadline_exceeded")
                if event.finish == "cancelled":
                    return
                raise _mapped(event.error or RuntimeError("engine error"))

        def usage() -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": timing.count, "total_tokens": len(ids) + timing.count}

        def done(status: int) -> None:
            service.record(model, status, len(ids), timing.count, None if timing.first is None else timing.first - timing.arrived)
            m = service.metrics
            m.requests.labels(model, status).inc()
            m.tokens_in.labels(model).inc(len(ids))
            m.tokens_out.labels(model).inc(timing.count)
            if timing.first is not None:
                m.ttft.labels(model).observe(timing.first - timing.arrived)
                if timing.count > 1:
                    m.tpot.labels(model).observe((timing.last - timing.first) / (timing.count - 1))

        def choice(delta: str, finish: str | None, stream: bool) -> dict:
            if not chat:
                return {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish}
            if stream:
                return {"index": 0, "delta": {"content": delta} if delta or finish is None else {}, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": delta}, "finish_reason": finish}

        obj = "chat.completion" if chat else "text_completion"
        if not body.stream:
            parts, finish = [], None
            try:
                async for delta, finish in tokens():
                    parts.append(delta)
            except ApiError as e:
                done(e.status)
                raise
            if finish is None:            # the client left
                done(499)
                return PlainTextResponse("", status_code=499)
            done(200)
            return {"id": rid, "object": obj, "created": created, "model": model,
                    "choices": [choice("".join(parts), finish, stream=False)], "usage": usage()}

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def sse():
            chunk = {"id": rid, "object": obj + (".chunk" if chat else ""), "created": created, "model": model}
            status = 200
            try:
                if chat:
                    first = {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
                    yield f"data: {json.dumps(first)}\n\n"
                async for delta, finish in tokens():
                    if delta:
                        yield f"data: {json.dumps({**chunk, 'choices': [choice(delta, None, True)]})}\n\n"
                    if finish:
                        yield f"data: {json.dumps({**chunk, 'choices': [choice('', finish, True)]})}\n\n"
                if include_usage:
                    yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': usage()})}\n\n"
            except ApiError as e:
                status = e.status
                yield f"data: {json.dumps(e.body())}\n\n"
            finally:
                request.cancel()          # a client that left mid-stream frees its row
                done(status)
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    return app


class BodyLimit:
    """Refuse a request body over `limit` bytes: by its Content-Length at once, or, sent without one, as
    soon as more has arrived (plain ASGI, so that streaming and disconnect detection stay Starlette's)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send)
        seen = 0

        async def bounded():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, f"the request body is over {self.limit} bytes")
            return message
        try:
            await self.app(scope, bounded, send)
        except ApiError:
            await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = json.dumps(ApiError(413, f"the request body is over {self.limit} bytes").body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _Timing:
    def __init__(self, arrived: float):
        self.arrived, self.first, self.last, self.count = arrived, None, None, 0

    def token(self) -> None:
        now = time.monotonic()
        self.first = self.first if self.first is not None else now
        self.last, self.count = now, self.count + 1
