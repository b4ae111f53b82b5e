"""The client's identity, made locally: an Ed25519 key that signs updates and a TLS key whose certificate
the coordinator's CA signs at enrollment (mutual TLS for every later call). Private keys never leave."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from cryptography.x509.oid import NameOID

from offsite.files import atomic_write
from offsite.protos.offsite.v1 import coordinator_pb2 as pb
from offsite.sealing import raw_public


@dataclass(frozen=True)
class ClientIdentity:
    client_id: str
    job_id: str
    certificate_pem: bytes = field(repr=False)
    tls_key_pem: bytes = field(repr=False)   # secrets stay out of reprs and logs
    coordinator_key: X25519PublicKey = field(repr=False)
    signing_key: Ed25519PrivateKey = field(repr=False)


def _paths(workdir: Path) -> tuple[Path, Path, Path, Path]:
    return workdir / "identity.json", workdir / "signing.key", workdir / "tls.key", workdir / "tls.pem"


def _pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def load_identity(workdir: Path) -> ClientIdentity | None:
    meta_path, signing_path, tls_key_path, cert_path = _paths(workdir)
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    return ClientIdentity(meta["client_id"], meta["job_id"], cert_path.read_bytes(), tls_key_path.read_bytes(),
                          X25519PublicKey.from_public_bytes(bytes.fromhex(meta["coordinator_key"])),
                          serialization.load_pem_private_key(signing_path.read_bytes(), password=None))


def enroll(stub, token: str, workdir: Path) -> ClientIdentity:
    """Make both key pairs locally, trade the single-use token for a certificate, save everything (0600)."""
    signing, tls_key = Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "offsite client")]))
           .sign(tls_key, hashes.SHA256()))
    resp = stub.Enroll(pb.EnrollRequest(token=token, signing_public_key=raw_public(signing.public_key()),
                                        csr_pem=csr.public_bytes(serialization.Encoding.PEM)))
    meta_path, signing_path, tls_key_path, cert_path = _paths(workdir)
    atomic_write(signing_path, _pem(signing), mode=0o600)
    atomic_write(tls_key_path, _pem(tls_key), mode=0o600)
    atomic_write(cert_path, resp.certificate_pem)
    atomic_write(meta_path, json.dumps({"client_id": resp.client_id, "job_id": resp.job_id,
                                        "coordinator_key": resp.coordinator_public_key.hex()}).encode(), mode=0o600)
    return load_identity(workdir)
