"""`offsite cloud infer`: the inference server as its own process (training and serving scale apart):
uvicorn over TLS with the coordinator's server certificate, one engine per base model."""
from __future__ import annotations

import json
import logging
import re
import signal
import socket
from pathlib import Path

from offsite.cloud.blobs import BlobStore
from offsite.cloud.identity import StateLayout
from offsite.cloud.infer.service import InferenceService, ServeConfig
from offsite.errors import ConfigError
from offsite.files import atomic_write

log = logging.getLogger("offsite.cloud.infer")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(|B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def parse_size(text: str) -> int:
    """'512MiB', '2GB', '1000000' -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"a size is a number with an optional unit (KiB, MiB, GiB, KB, MB, GB), got {text[:40]!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _bind(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"--address must be host:port, got {address[:80]!r}")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    # listening from here on: a client that reads the port file and connects while uvicorn still starts waits in
    # the backlog instead of being refused (under load that start took long enough for tests to see ECONNREFUSED)
    sock.listen(2048)
    return sock


def run_infer(state_dir: str, address: str, config: ServeConfig, port_file: str | None = None, grace: float = 30.0) -> int:
    import uvicorn

    from offsite.cloud.infer.api import create_app

    layout = StateLayout(Path(state_dir))
    service = InferenceService(layout.open_state(), BlobStore(layout.blobs), config)
    bases = service.load_all()
    log.info("serving %d finished job(s) on %d base model(s)", len(service.catalog.jobs()), len(bases))
    sock = _bind(address)
    layout.serving.mkdir(exist_ok=True)
    summary = layout.serving / f"{socket.gethostname()}-{sock.getsockname()[1]}.json"
    server = _Server(uvicorn.Config(create_app(service, summary), ssl_certfile=str(layout.server_cert), ssl_keyfile=str(layout.server_key),
                                    log_level="warning", timeout_graceful_shutdown=int(grace), access_log=False), service)
    if port_file:
        atomic_write(Path(port_file), json.dumps({"port": sock.getsockname()[1]}).encode())
    log.info("OpenAI-compatible API on https://%s:%d/v1", *sock.getsockname()[:2])
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn re-raises the signal it drained on: end normally instead
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    service.drain(timeout=grace)
    return 0


class _Server:
    """uvicorn's server, telling the service at the first SIGTERM so that /healthz and new requests answer
    503 while the requests in flight finish."""

    def __new__(cls, config, service: InferenceService):
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame) -> None:
                service.draining = True
                super().handle_exit(sig, frame)

        return Server(config)
