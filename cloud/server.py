"""Start the coordinator's gRPC server: TLS, health service, options from offsite.transport."""
from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from offsite.cloud.coordinator import Coordinator
from offsite.cloud.identity import StateLayout
from offsite.cloud.service import CoordinatorService
from offsite.protos.offsite.v1 import coordinator_pb2_grpc as pb_grpc
from offsite.transport import SERVER_OPTIONS, server_credentials

SERVICE_NAME = "offsite.v1.Coordinator"


@dataclass(frozen=True)
class Running:
    server: grpc.Server
    port: int          # mutual TLS: every call but Enroll
    enroll_port: int   # server-only TLS: Enroll (other calls find no client certificate and are refused)
    health: health.HealthServicer


def start_server(coordinator: Coordinator, layout: StateLayout, address: str, enroll_address: str,
                 workers: int = 16) -> Running:
    """Bind both ports (port 0 picks a free one) with one servicer behind them."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=SERVER_OPTIONS)
    pb_grpc.add_CoordinatorServicer_to_server(CoordinatorService(coordinator), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_secure_port(address, server_credentials(layout.server_key, layout.server_cert, layout.ca_cert))
    enroll_port = server.add_secure_port(enroll_address, server_credentials(layout.server_key, layout.server_cert, None))
    if port == 0 or enroll_port == 0:
        raise OSError(f"could not bind {address} and {enroll_address}")
    server.start()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Running(server, port, enroll_port, health_servicer)
