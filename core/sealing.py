"""Sealed updates: encrypted to the coordinator, signed by the client, bound to job/round/client/skeleton.

Envelope (bytes): MAGIC | ephemeral X25519 public key (32) | nonce (12) | AES-256-GCM ciphertext+tag
| Ed25519 signature (64). The AES key is HKDF-SHA256 of the X25519 shared secret; the context (job,
round, client, skeleton digest) is the GCM associated data and is covered by the signature, so an
update cannot be replayed into another round or job or passed off as another client's.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from offsite.errors import InvalidUpdateError

MAGIC = b"OFFSITE-SEAL-1\n"
_KEY, _NONCE, _SIG = 32, 12, 64
_HEADER = len(MAGIC) + _KEY + _NONCE


@dataclass(frozen=True)
class SealContext:
    job_id: str
    round: int
    client_id: str
    skeleton_digest: str

    def associated_data(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()


def raw_public(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _derive_key(shared: bytes, ephemeral_pub: bytes, recipient_pub: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"offsite/v1 sealed update" + ephemeral_pub + recipient_pub).derive(shared)


def seal(plaintext: bytes, ctx: SealContext, recipient: X25519PublicKey, signer: Ed25519PrivateKey) -> bytes:
    ephemeral = X25519PrivateKey.generate()
    eph_pub = raw_public(ephemeral.public_key())
    key = _derive_key(ephemeral.exchange(recipient), eph_pub, raw_public(recipient))
    nonce = os.urandom(_NONCE)
    body = MAGIC + eph_pub + nonce + AESGCM(key).encrypt(nonce, plaintext, ctx.associated_data())
    return body + signer.sign(ctx.associated_data() + body)


def open_sealed(envelope: bytes, ctx: SealContext, recipient: X25519PrivateKey, signer: Ed25519PublicKey) -> bytes:
    """Verify the signature, then decrypt. Raises InvalidUpdateError saying which check failed."""
    if len(envelope) < _HEADER + 16 + _SIG or not envelope.startswith(MAGIC):
        raise InvalidUpdateError("sealed update is malformed (bad header or too short)")
    body, signature = envelope[:-_SIG], envelope[-_SIG:]
    try:
        signer.verify(signature, ctx.associated_data() + body)
    except InvalidSignature:
        raise InvalidUpdateError("sealed update signature does not verify for this client, job and round") from None
    eph_pub = body[len(MAGIC) : len(MAGIC) + _KEY]
    nonce = body[len(MAGIC) + _KEY : _HEADER]
    key = _derive_key(recipient.exchange(X25519PublicKey.from_public_bytes(eph_pub)), eph_pub, raw_public(recipient.public_key()))
    try:
        return AESGCM(key).decrypt(nonce, body[_HEADER:], ctx.associated_data())
    except InvalidTag:
        raise InvalidUpdateError("sealed update does not decrypt (tampered or sealed to another key)") from None
