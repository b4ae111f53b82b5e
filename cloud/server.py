"""The coordinator's gRPC edge, on asyncio (grpc.aio), so that idle, slow or many calls cannot stall it.

- An idle call costs no thread. Every method is served as a request stream, so the edge itself awaits
  the request message, with a deadline (`request_timeout_s`), as it awaits each upload part
  (`part_timeout_s`) and the client's taking of each download chunk (`send_timeout_s`): a call that stops
  moving is cut with DEADLINE_EXCEEDED.
- Blocking work (the state database, tensors, crypto) runs on a bounded thread pool; the event loop only
  moves messages, so the health service answers whatever the pool is doing.
- One enrolled client has at most `calls_per_client` calls in flight; more get RESOURCE_EXHAUSTED at once.
  A call keeps its slot until the transport has finished with it, not just the handler: a download cut
  while its client reads nothing still holds the chunk being sent (gRPC cannot cancel a send in flight)
  until the client goes away, and this way one client can never pin more than `downloads_per_client` of them.
- The enrollment port is its own server with tighter transport limits (few streams per connection, a short
  connection age, small messages, a connection cap); the mutual-TLS port has its own caps.
- Every request message is bounded field by field (offsite.cloud.serde) before anything uses it. Errors
  map to status codes (offsite.cloud.service.STATUS); anything unexpected is INTERNAL without its text;
  no status detail is longer than DETAIL_CHARS.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Awaitable, Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from offsite.cloud import serde
from offsite.cloud.coordinator import Coordinator
from offsite.cloud.worker import RoundWorker
from offsite.cloud.identity import StateLayout
from offsite.cloud.limits import Limits
from offsite.cloud.metrics import Metrics
from offsite.cloud.service import CoordinatorService, status_of
from offsite.errors import InvalidRequestError, OffsiteError, shown
from offsite.protos.offsite.v1 import coordinator_pb2 as pb
from offsite.transport import SERVER_OPTIONS, server_credentials

SERVICE_NAME = "offsite.v1.Coordinator"
DETAIL_CHARS = 512
ENROLL_MESSAGE_BYTES = 64 << 10   # an Enroll request is a token, a key and a CSR: about 1 KiB
log = logging.getLogger("offsite.cloud.server")


class _Refused(Exception):
    """A call the edge itself ends: over a limit, or stopped moving."""

    def __init__(self, code: grpc.StatusCode, reason: str, detail: str):
        super().__init__(detail)
        self.code, self.reason = code, reason


def _peer_client_id(context) -> str | None:
    """The common name of the peer's client certificate, present only if our CA verified it."""
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"] or not auth.get("x509_common_name"):
        return None
    return auth["x509_common_name"][0].decode()


class _QuietStalledSends(logging.Filter):
    """gRPC logs an error with a traceback when a call whose last send never drained ends (a download the
    client stopped reading, cut at send_timeout_s): the client's doing, counted in offsite_calls_refused,
    so it is demoted to debug here rather than let any client fill the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("ExecuteBatchError raised in core"):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return log.isEnabledFor(logging.DEBUG)
        return True


logging.getLogger("grpc._cython.cygrpc").addFilter(_QuietStalledSends())


class _Edge:
    """The asyncio side of every method: receive with deadlines, cap per client, hand blocking work to the
    pool, map errors. Runs on the event loop's thread only, so its counters need no lock."""

    def __init__(self, service: CoordinatorService, limits: Limits, pool: futures.ThreadPoolExecutor, metrics: Metrics):
        self.service, self.limits, self.pool, self.metrics = service, limits, pool, metrics
        self.in_flight: dict[tuple[str, str], int] = {}   # (client id, "calls" | "downloads") -> how many in flight
        self.total = 0

    # --- building blocks ------------------------------------------------------------------------
    def _take_slot(self, peer: str | None, context, name: str) -> None:
        """Count the call against its client until the transport is done with it (see the module doc)."""
        keys = [] if peer is None else [(peer, "calls")] + ([(peer, "downloads")] if name == "Download" else [])
        for key in keys:
            cap = self.limits.downloads_per_client if key[1] == "downloads" else self.limits.calls_per_client
            if self.in_flight.get(key, 0) >= cap:
                raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "client_calls",
                               f"client {shown(peer, 40)} already has {cap} {key[1]} in flight (limit {key[1]}_per_client)")
        for key in keys:
            self.in_flight[key] = self.in_flight.get(key, 0) + 1
        self.total += 1
        released = False

        def release(_context=None) -> None:
            nonlocal released
            if released:
                return
            released = True
            self.total -= 1
            for key in keys:
                self.in_flight[key] -= 1
                if not self.in_flight[key]:
                    del self.in_flight[key]

        context.add_done_callback(release)
        if context.done():
            release()

    async def _blocking(self, fn: Callable, *args):
        """`fn(*args)` on the pool. If the call is cancelled meanwhile, wait for the work to end anyway."""
        future = asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await future
            raise

    async def _receive(self, context, timeout_s: float, reason: str, what: str):
        """The next request message, checked against its bounds; None at the end of the stream."""
        try:
            async with asyncio.timeout(timeout_s):
                message = await context.read()
        except TimeoutError:
            raise _Refused(grpc.StatusCode.DEADLINE_EXCEEDED, reason, f"no {what} arrived within {timeout_s:g} s") from None
        if message is grpc.aio.EOF:
            return None
        serde.check(message)
        return message

    async def _request(self, context):
        message = await self._receive(context, self.limits.request_timeout_s, "request_timeout", "request message")
        if message is None:
            raise InvalidRequestError("the call ended before its request message")
        return message

    async def _send(self, context, message) -> bool:
        """Write one message; False if the client took nothing for send_timeout_s (the call is then over:
        no status can follow a send that never drained)."""
        try:
            async with asyncio.timeout(self.limits.send_timeout_s):
                await context.write(message)
            return True
        except TimeoutError:
            self.metrics.calls_refused.labels("send_timeout").inc()
            return False

    async def _call(self, name: str, context, body: Callable[[str | None], Awaitable]):
        """Run `body(peer)` in the caller's slot and end the call with the right status on any error."""
        peer, started = _peer_client_id(context), time.perf_counter()
        try:
            self._take_slot(peer, context, name)
            return await body(peer)
        except _Refused as e:
            self.metrics.calls_refused.labels(e.reason).inc()
            await context.abort(e.code, str(e))
        except OffsiteError as e:
            await context.abort(status_of(e), _clip(str(e)))
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception:  # a bug, not the client's doing: log it, and tell the client nothing of it
            log.exception("%s failed", name)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; the coordinator logged it")
        finally:
            self.metrics.call_seconds.labels(name).observe(time.perf_counter() - started)

    # --- the kinds of methods -------------------------------------------------------------------
    def unary(self, name: str) -> Callable:
        method = getattr(self.service, name)

        async def handle(request_iterator, context):
            async def body(peer):
                request = await self._request(context)
                return await self._blocking(method, request, peer)
            return await self._call(name, context, body)
        return handle

    async def download(self, request_iterator, context):
        async def body(peer):
            request = await self._request(context)
            chunks = await self._blocking(self.service.Download, request, peer)
            ahead = asyncio.ensure_future(self._blocking(next, chunks, None))  # read from disk while the last is sent
            try:
                while (chunk := await ahead) is not None:
                    ahead = asyncio.ensure_future(self._blocking(next, chunks, None))
                    if not await self._send(context, chunk):
                        return
            finally:
                with contextlib.suppress(BaseException):  # the read in flight ends before the generator closes
                    await ahead
                await self._blocking(chunks.close)  # counts the bytes served
        return await self._call("Download", context, body)

    async def upload_chunks(self, request_iterator, context):
        async def body(peer):
            client = await self._blocking(self.service.authenticate, peer)
            upload_id, offset = None, 0
            while (part := await self._receive(context, self.limits.part_timeout_s, "part_timeout", "upload part")) is not None:
                offset = await self._blocking(self.service.UploadPart, part, client, upload_id)
                upload_id = part.upload_id
            return await self._blocking(self.service.FinishUpload, client, upload_id, offset)
        return await self._call("UploadChunks", context, body)

    def handler(self) -> grpc.GenericRpcHandler:
        """Every method of the Coordinator service, each read as a request stream (see the module doc)."""
        streams = {"Download": self.download, "UploadChunks": self.upload_chunks}
        handlers = {}
        for m in pb.DESCRIPTOR.services_by_name["Coordinator"].methods:
            request, reply = (getattr(pb, t.name) for t in (m.input_type, m.output_type))
            behaviour = streams.get(m.name) or self.unary(m.name)
            kind = grpc.stream_stream_rpc_method_handler if m.server_streaming else grpc.stream_unary_rpc_method_handler
            serialize = _as_is if m.name in _SERIALIZED_BY_SERVICE else reply.SerializeToString
            handlers[m.name] = kind(behaviour, request_deserializer=request.FromString, response_serializer=serialize)
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


_SERIALIZED_BY_SERVICE = {"Download"}  # its chunks arrive as bytes already (offsite.chunks.encode)


def _as_is(data: bytes) -> bytes:
    return data


def _clip(detail: str) -> str:
    return detail if len(detail) <= DETAIL_CHARS else detail[: DETAIL_CHARS - 15] + "... (cut short)"


def _options(limits: Limits, enroll: bool) -> list[tuple[str, int]]:
    """Transport options per port, over the shared ones in offsite.transport."""
    ms = lambda s: int(s * 1000)  # noqa: E731
    options = dict(SERVER_OPTIONS)
    options.update({"grpc.server_handshake_timeout_ms": ms(limits.handshake_timeout_s),
                    "grpc.max_connection_idle_ms": ms(limits.idle_connection_s),
                    "grpc.http2.max_ping_strikes": 2})  # pings faster than the server allows: GOAWAY
    if enroll:
        options.update({"grpc.max_allowed_incoming_connections": limits.enroll_connections,
                        "grpc.max_concurrent_streams": limits.enroll_streams_per_connection,
                        "grpc.max_connection_age_ms": ms(limits.enroll_connection_age_s),
                        "grpc.max_connection_age_grace_ms": ms(limits.request_timeout_s),
                        "grpc.max_receive_message_length": ENROLL_MESSAGE_BYTES,
                        "grpc.keepalive_permit_without_calls": 0})
    else:
        options.update({"grpc.max_allowed_incoming_connections": limits.connections,
                        "grpc.max_concurrent_streams": limits.streams_per_connection})
    return list(options.items())


@dataclass
class Running:
    """The two servers, on an event loop in a thread of their own."""
    port: int          # mutual TLS: every call but Enroll
    enroll_port: int   # server-only TLS: Enroll (other calls find no client certificate and are refused)
    _loop: asyncio.AbstractEventLoop
    _thread: threading.Thread
    _servers: tuple[grpc.aio.Server, ...]
    _health: health.aio.HealthServicer
    _pool: futures.ThreadPoolExecutor
    edge: _Edge
    worker: RoundWorker

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def enter_graceful_shutdown(self) -> None:
        """Health turns NOT_SERVING (what `serve` does on SIGTERM before it drains)."""
        self._run(self._health.enter_graceful_shutdown())

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, give in-flight ones up to `grace` seconds, then end the loop and the pool."""
        async def stop_all():
            await asyncio.gather(*(s.stop(grace) for s in self._servers))
        if self._thread.is_alive():
            self._run(stop_all())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._pool.shutdown(wait=True)
        self.worker.stop()  # after the calls drained: a drained upload may have completed a round
        self.worker.coordinator.state.flush_touches()


def start_server(coordinator: Coordinator, layout: StateLayout, address: str, enroll_address: str,
                 limits: Limits | None = None) -> Running:
    """Bind both ports (port 0 picks a free one) with one service behind them; returns once both serve."""
    missing = serde.uncovered()
    if missing:
        raise RuntimeError(f"request fields without a bound in offsite.cloud.serde.RULES: {missing}")
    limits = limits or Limits()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="grpc-edge", daemon=True)
    thread.start()
    pool = futures.ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="coordinator")
    edge = _Edge(CoordinatorService(coordinator), limits, pool, coordinator.metrics)
    coordinator.metrics.calls_in_flight.set_function(lambda: edge.total)

    async def start() -> tuple:
        health_servicer = health.aio.HealthServicer()
        servers, ports = [], []
        for bind, enroll, ca, calls in ((address, False, layout.ca_cert, limits.calls),
                                        (enroll_address, True, None, limits.enroll_calls)):
            server = grpc.aio.server(options=_options(limits, enroll), maximum_concurrent_rpcs=calls)
            server.add_generic_rpc_handlers((edge.handler(),))
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            ports.append(server.add_secure_port(bind, server_credentials(layout.server_key, layout.server_cert, ca)))
            servers.append(server)
        if 0 in ports:
            raise OSError(f"could not bind {address} and {enroll_address}")
        for server in servers:
            await server.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        return tuple(servers), ports, health_servicer

    try:
        servers, ports, health_servicer = asyncio.run_coroutine_threadsafe(start(), loop).result()
    except BaseException:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        pool.shutdown(wait=False)
        raise
    return Running(ports[0], ports[1], loop, thread, servers, health_servicer, pool, edge, RoundWorker(coordinator).start())
