"""Randomness that must not be predictable (DP noise, secure-aggregation masks): a ChaCha20 keystream
from `cryptography`, keyed by a 32-byte seed. torch's and numpy's generators are not cryptographic: an
observer who learns their state can predict, and subtract, everything they draw next."""
from __future__ import annotations

import math
import secrets

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

SEED_BYTES = 32


def new_seed() -> bytes:
    return secrets.token_bytes(SEED_BYTES)


def keystream(seed: bytes, n: int, stream: int = 0) -> bytes:
    """`n` bytes of the ChaCha20 keystream under key `seed`; `stream` picks one of 2^64 independent streams."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a keystream seed is {SEED_BYTES} bytes, got {len(seed)}")
    nonce = (0).to_bytes(8, "little") + stream.to_bytes(8, "little")  # block counter starts at 0
    return Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor().update(bytes(n))


def uint64s(seed: bytes, count: int, stream: int = 0) -> np.ndarray:
    """`count` uniform 64-bit unsigned integers."""
    return np.frombuffer(keystream(seed, 8 * count, stream), dtype="<u8")


def gaussian(seed: bytes, count: int, stream: int = 0) -> torch.Tensor:
    """`count` standard normal float64 values by the Box-Muller transform of keystream uniforms."""
    pairs = (count + 1) // 2
    bits = uint64s(seed, 2 * pairs, stream) >> np.uint64(11)           # 53 random bits each
    u = (bits.astype(np.float64) + 1.0) * 2.0 ** -53                    # uniform on (0, 1]
    radius = np.sqrt(-2.0 * np.log(u[:pairs]))
    angle = 2.0 * math.pi * u[pairs:]
    return torch.from_numpy(np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count].copy())
