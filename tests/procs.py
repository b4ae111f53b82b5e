"""Helpers for tests that drive the real `offsite` command as separate processes over loopback TLS."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offsite.transport import secure_channel


def offsite(*args) -> list[str]:
    return [sys.executable, "-m", "offsite.cli", *args]


def serve_until_done(state: Path, port_file: Path) -> tuple[subprocess.Popen, dict]:
    """`cloud serve --exit-when-done` on ports it picks; the process and its ports, once it serves."""
    server = subprocess.Popen(offsite("cloud", "serve", "--state", str(state), "--address", "127.0.0.1:0",
                                      "--port-file", str(port_file), "--exit-when-done"))
    try:
        deadline = time.time() + 60
        while not port_file.exists():
            assert server.poll() is None and time.time() < deadline, "coordinator did not start"
            time.sleep(0.1)
        return server, json.loads(port_file.read_text())
    except BaseException:
        server.kill()
        raise


def run_clients(state: Path, ports: dict, client_data: list[Path], workdirs: Path) -> list[subprocess.Popen]:
    """`offsite client run` for each data folder (named like its client: train.jsonl, and heldout.jsonl if
    there is one), stderr captured."""
    return [subprocess.Popen(offsite("client", "run", "--server", f"localhost:{ports['port']}",
                                     "--enroll-server", f"localhost:{ports['enroll_port']}", "--ca", str(state / "tls" / "ca.pem"),
                                     "--workdir", str(workdirs / f.name), "--data", str(f / "train.jsonl"),
                                     *(["--heldout", str(f / "heldout.jsonl")] if (f / "heldout.jsonl").is_file() else []),
                                     "--token-file", str(state / "tokens" / f"{f.name}.token"), "--threads", "1",
                                     "--no-progress"), stderr=subprocess.PIPE, text=True)
            for f in client_data]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def popen(args: list[str], failpoints: str = "", **kwargs) -> subprocess.Popen:
    """Start a process; `failpoints` arms OFFSITE_FAILPOINTS (a real SIGKILL at a named point)."""
    env = {k: v for k, v in os.environ.items() if k != "OFFSITE_FAILPOINTS"}
    if failpoints:
        env["OFFSITE_FAILPOINTS"] = failpoints
    return subprocess.Popen(args, env=env, **kwargs)


def serve(state: Path, port: int, enroll_port: int, failpoints: str = "", extra: tuple[str, ...] = ()) -> subprocess.Popen:
    return popen(offsite("cloud", "serve", "--state", str(state), "--address", f"127.0.0.1:{port}",
                         "--enroll-address", f"127.0.0.1:{enroll_port}", *extra), failpoints)


def client(state: Path, port: int, enroll_port: int, data: Path, workdir: Path, name: str, failpoints: str = "",
           extra: tuple[str, ...] = ()) -> subprocess.Popen:
    return popen(offsite("client", "run", "--server", f"localhost:{port}", "--enroll-server", f"localhost:{enroll_port}",
                         "--ca", str(state / "tls" / "ca.pem"), "--workdir", str(workdir), "--data", str(data / "train.jsonl"),
                         "--token-file", str(state / "tokens" / f"{name}.token"), "--threads", "1", "--no-progress",
                         *extra), failpoints, stderr=subprocess.PIPE, text=True)


def wait_serving(state: Path, enroll_port: int, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """Wait until the coordinator's gRPC health service says SERVING (checked on the server-TLS port)."""
    deadline = time.time() + timeout_s
    with secure_channel(f"localhost:{enroll_port}", state / "tls" / "ca.pem") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            assert proc.poll() is None, f"coordinator exited with {proc.returncode}"
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service="offsite.v1.Coordinator"), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            assert time.time() < deadline, "coordinator did not become SERVING"
            time.sleep(0.2)
