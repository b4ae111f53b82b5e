"""The client's identity: an Ed25519 key made locally, and the session the coordinator issued."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from offsite.files import atomic_write
from offsite.protos.offsite.v1 import coordinator_pb2 as pb
from offsite.sealing import raw_public


@dataclass(frozen=True)
class ClientIdentity:
    client_id: str
    session_token: str = field(repr=False)   # secrets stay out of reprs and logs
    job_id: str
    coordinator_key: X25519PublicKey = field(repr=False)
    signing_key: Ed25519PrivateKey = field(repr=False)

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.session_token}"),)


def _paths(workdir: Path) -> tuple[Path, Path]:
    return workdir / "identity.json", workdir / "signing.key"


def load_identity(workdir: Path) -> ClientIdentity | None:
    meta_path, key_path = _paths(workdir)
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    return ClientIdentity(meta["client_id"], meta["session_token"], meta["job_id"],
                          X25519PublicKey.from_public_bytes(bytes.fromhex(meta["coordinator_key"])), key)


def enroll(stub, token: str, workdir: Path) -> ClientIdentity:
    """Make a key pair locally, trade the single-use token for a session, save both (0600)."""
    key = Ed25519PrivateKey.generate()
    resp = stub.Enroll(pb.EnrollRequest(token=token, signing_public_key=raw_public(key.public_key())))
    meta_path, key_path = _paths(workdir)
    atomic_write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()), mode=0o600)
    atomic_write(meta_path, json.dumps({"client_id": resp.client_id, "session_token": resp.session_token,
                                        "job_id": resp.job_id,
                                        "coordinator_key": resp.coordinator_public_key.hex()}).encode(), mode=0o600)
    return load_identity(workdir)
