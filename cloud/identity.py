"""The coordinator's identity material: a CA (which also signs client certificates at enrollment), a TLS
server certificate, the X25519 key updates are sealed to, and single-use enrollment tokens. Private keys
are written 0600 and never logged."""
from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from offsite.cloud.state import State, db_url, open_state
from offsite.errors import AlreadyExistsError, ConfigError, InvalidRequestError
from offsite.files import atomic_write

CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a client name: a token file's name and a roster entry


@dataclass(frozen=True)
class StateLayout:
    """Where everything lives inside a coordinator's state folder."""

    root: Path

    @property
    def ca_cert(self) -> Path: return self.root / "tls" / "ca.pem"
    @property
    def ca_key(self) -> Path: return self.root / "tls" / "ca.key"
    @property
    def server_cert(self) -> Path: return self.root / "tls" / "server.pem"
    @property
    def server_key(self) -> Path: return self.root / "tls" / "server.key"
    @property
    def sealing_key(self) -> Path: return self.root / "keys" / "coordinator.x25519"
    @property
    def db(self) -> Path: return self.root / "state.sqlite"
    @property
    def database_url(self) -> Path: return self.root / "database.url"   # only when `init --db` chose another database

    def state_url(self) -> str:
        """Where this folder's state database is (see offsite.cloud.state.db_url)."""
        configured = self.database_url.read_text().strip() if self.database_url.is_file() else None
        return db_url(self.db, configured)

    def open_state(self) -> State:
        """The state database of a folder `offsite cloud init` made."""
        if not self.ca_cert.is_file():
            raise ConfigError(f"{self.root} is not a coordinator state folder; run `offsite cloud init` first")
        return open_state(self.state_url())
    @property
    def blobs(self) -> Path: return self.root / "blobs"
    @property
    def tokens(self) -> Path: return self.root / "tokens"
    @property
    def jobs(self) -> Path: return self.root / "jobs"
    @property
    def uploads(self) -> Path: return self.root / "uploads"
    @property
    def scratch(self) -> Path: return self.root / "scratch"   # a round's proposals while a robust rule combines them
    @property
    def serving(self) -> Path: return self.root / "serving"   # one summary per `cloud infer` process, for the status page


def hash_secret(secret: str) -> str:
    """Tokens are stored only as hashes: a leaked database does not let anyone enroll or log in."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _cert(subject: str, public_key, issuer_key, issuer_name: x509.Name | None, ca: bool, hosts: list[str], days: int,
          usage=None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if hosts:
        sans = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def init_state(root: str | Path, client_names: list[str], hosts: list[str], token_ttl_s: float,
               database: str | None = None) -> dict[str, Path]:
    """Create a new state folder, its database at `database` (a URL; default SQLite in the folder).
    Returns {client name: path of its enrollment token file}."""
    layout = StateLayout(Path(root))
    if layout.db.exists() or layout.ca_cert.exists():
        raise ConfigError(f"{layout.root} already holds a coordinator state; refusing to overwrite it")
    if len(set(client_names)) != len(client_names) or not client_names:
        raise ConfigError(f"client names must be unique and non-empty: {client_names}")
    _check_names(client_names)
    if database:
        open_state(database)  # an unreachable database fails here, before anything is written
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _cert("offsite coordinator CA", ca_key.public_key(), ca_key, None, True, [], 3650)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _cert(hosts[0], server_key.public_key(), ca_key, ca_cert.subject, False, hosts, 825,
                        usage=ExtendedKeyUsageOID.SERVER_AUTH)
    atomic_write(layout.ca_key, _pem_key(ca_key), mode=0o600)
    atomic_write(layout.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    atomic_write(layout.server_key, _pem_key(server_key), mode=0o600)
    atomic_write(layout.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    atomic_write(layout.sealing_key, _pem_key(X25519PrivateKey.generate()), mode=0o600)
    if database:
        atomic_write(layout.database_url, (database + "\n").encode(), mode=0o600)
    return issue_tokens(layout, layout.open_state(), client_names, token_ttl_s)


def _check_names(names: list[str]) -> None:
    bad = [n for n in names if not CLIENT_NAME.fullmatch(n)]
    if bad:
        raise ConfigError(f"client names must match {CLIENT_NAME.pattern} (a name is a file name and a roster "
                          f"entry): {bad!r:.200}")


def issue_tokens(layout: StateLayout, state: State, names: list[str], token_ttl_s: float) -> dict[str, Path]:
    """One single-use enrollment token per name, written to STATE/tokens/NAME.token (0600); only its hash
    is stored. A name that already has a client or a token is refused, before any token is made."""
    _check_names(names)
    taken = {c.name for c in state.clients()} | {n for n in names if state.has_token(n)}
    if taken & set(names) or len(set(names)) != len(names):
        raise AlreadyExistsError(f"client names already in use or repeated: {sorted(taken & set(names)) or names}")
    token_files = {}
    for name in names:
        token = secrets.token_urlsafe(32)
        state.add_token(hash_secret(token), name, time.time() + token_ttl_s)
        token_files[name] = layout.tokens / f"{name}.token"
        atomic_write(token_files[name], (token + "\n").encode(), mode=0o600)
    return token_files


class CertificateAuthority:
    """The coordinator's CA: signs the client certificates that every call after enrollment presents."""

    def __init__(self, key, cert: x509.Certificate):
        self._key, self.cert = key, cert

    @classmethod
    def load(cls, layout: StateLayout) -> "CertificateAuthority":
        key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
        return cls(key, x509.load_pem_x509_certificate(layout.ca_cert.read_bytes()))

    @staticmethod
    def load_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
        """Parse and check a client's signing request (before anything is spent on it)."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError:
            raise InvalidRequestError("csr_pem is not a PEM certificate signing request") from None
        if not csr.is_signature_valid:
            raise InvalidRequestError("the certificate signing request is not signed by its own key")
        return csr

    def issue_client_certificate(self, csr: x509.CertificateSigningRequest, client_id: str, days: int = 365) -> bytes:
        """Sign the CSR's public key as `client_id` (the CSR's own subject is ignored)."""
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, client_id)]))
                .issuer_name(self.cert.subject).public_key(csr.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(self._key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM)


def load_sealing_key(layout: StateLayout) -> X25519PrivateKey:
    return serialization.load_pem_private_key(layout.sealing_key.read_bytes(), password=None)
