"""Who a client is: enrollment (a one-time token for a registered signing key and a TLS certificate), and
the identity behind each later call."""
from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from offsite.cloud.identity import hash_secret
from offsite.cloud.state import ClientRecord
from offsite.errors import AuthError, InvalidRequestError, NotFoundError
from offsite.sealing import raw_public

if TYPE_CHECKING:
    from offsite.cloud.coordinator import Coordinator

log = logging.getLogger("offsite.cloud")


@dataclass(frozen=True)
class Enrollment:
    client_id: str
    certificate_pem: bytes
    coordinator_public_key: bytes
    job_id: str


class Enrollments:
    def __init__(self, coordinator: Coordinator):
        self.c = coordinator

    def enroll(self, token: str, signing_key: bytes, csr_pem: bytes) -> Enrollment:
        """Consume the token, register the signing key, and sign the client's TLS certificate."""
        state, ca = self.c.state, self.c.ca
        try:
            Ed25519PublicKey.from_public_bytes(signing_key)
        except ValueError:
            raise InvalidRequestError("signing_public_key must be a raw 32-byte Ed25519 public key") from None
        csr = ca.load_csr(csr_pem)  # a malformed request must not spend the token
        name = state.consume_token(hash_secret(token), self.c.now())
        if name is None:
            raise AuthError("enrollment token is unknown, already used or expired")
        client_id = f"{name}-{secrets.token_hex(4)}"
        certificate = ca.issue_client_certificate(csr, client_id)
        state.add_client(client_id, name, signing_key)
        log.info("client %s enrolled", client_id)
        running = [job.job_id for job in self.c.jobs_of(state.client(client_id)) if job.status == "running"]
        return Enrollment(client_id, certificate, raw_public(self.c.sealing_key.public_key()), running[0] if running else "")

    def authenticate(self, client_id: str | None) -> ClientRecord:
        """The client behind a verified TLS client certificate; unknown or revoked clients are refused."""
        if not client_id:
            raise AuthError("this call needs mutual TLS with the client certificate issued at enrollment")
        try:
            client = self.c.state.client(client_id)
        except NotFoundError:
            raise AuthError(f"unknown client {client_id}") from None
        if client.revoked_at is not None:
            raise AuthError(f"client {client_id} is revoked")
        self.c.state.touch_client(client.client_id)
        return client
