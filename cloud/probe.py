"""Is the coordinator serving? The standard gRPC health check (grpc.health.v1 Health/Check) over TLS, for
liveness and readiness probes and compose healthchecks: `offsite cloud probe` or, lighter,
`python -m offsite.cloud.probe` with the same arguments.

Point it at the enrollment port: it serves server-only TLS, so the check needs only the CA file, no
client certificate. The server certificate must name the target's host (`offsite cloud init --host`).

This module imports grpc and nothing of torch: `python -m offsite.cloud.probe` answers in a fraction of a
second, where the `offsite` command first loads torch and transformers (seconds of CPU on every probe)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offsite.transport import secure_channel

# = offsite.cloud.server.SERVICE_NAME (a test checks it): importing that module would load torch.
SERVICE = "offsite.v1.Coordinator"


def check(target: str, ca_file: Path, service: str = SERVICE, timeout: float = 5.0) -> tuple[bool, str]:
    """(serving?, the status name or why the check failed). Raises OSError if the CA file cannot be read."""
    with secure_channel(target, ca_file) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                               timeout=timeout)
        except grpc.RpcError as e:  # unreachable, TLS refused, unknown service (NOT_FOUND), timeout
            return False, f"{e.code().name}: {e.details()}"
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, name


def probe(target: str, ca_file: Path, service: str = SERVICE, timeout: float = 5.0) -> bool:
    """True iff the coordinator at `target` reports `service` SERVING (False while it drains on SIGTERM)."""
    return check(target, ca_file, service, timeout)[0]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `offsite cloud probe` and `python -m offsite.cloud.probe` (one definition)."""
    parser.add_argument("--target", required=True,
                        help="coordinator host:port: the enrollment port (TLS without a client certificate)")
    parser.add_argument("--ca", required=True, help="the coordinator's CA certificate (PEM)")
    parser.add_argument("--service", default=SERVICE, help="health service name ('' asks about the whole server)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer")


def run(args: argparse.Namespace) -> int:
    """Exit code 0 when serving, 1 otherwise, with one line saying which."""
    try:
        ok, detail = check(args.target, Path(args.ca), args.service, args.timeout)
    except OSError as e:
        ok, detail = False, f"cannot read the CA file: {e}"
    print(f"{args.target} {args.service or '(server)'}: {detail}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m offsite.cloud.probe", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
