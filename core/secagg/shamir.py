"""Shamir secret sharing of 32-byte secrets (self-mask seeds, X25519 mask keys), t of n.

PyCryptodome's Shamir works over GF(2^128) on 16-byte secrets, with coefficients from its CSPRNG; a
32-byte secret is shared as its two halves, each share carrying both halves' points."""
from __future__ import annotations

from Crypto.Protocol.SecretSharing import Shamir

from offsite.errors import InvalidRequestError

SECRET_BYTES = 32
Share = tuple[int, bytes]  # (x = 1..n, 32 bytes)


def split(secret: bytes, t: int, n: int) -> list[Share]:
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a shared secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= t <= n:
        raise ValueError(f"threshold must be in 1..{n}, got {t}")
    lo, hi = Shamir.split(t, n, secret[:16]), Shamir.split(t, n, secret[16:])
    return [(x, a + b) for (x, a), (_, b) in zip(lo, hi)]


def combine(shares: list[Share], t: int) -> bytes:
    """The secret from any `t` distinct shares (more are ignored)."""
    distinct = {x: s for x, s in shares}
    if len(distinct) < t:
        raise InvalidRequestError(f"{len(distinct)} shares cannot rebuild a secret shared {t} of n")
    chosen = sorted(distinct.items())[:t]
    if any(len(s) != SECRET_BYTES for _, s in chosen):
        raise InvalidRequestError("a share has the wrong length")
    return Shamir.combine([(x, s[:16]) for x, s in chosen]) + Shamir.combine([(x, s[16:]) for x, s in chosen])
