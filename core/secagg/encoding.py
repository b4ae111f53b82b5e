"""Fixed-point encoding: float64 values as integers modulo 2^64, where masks add and cancel exactly.

x encodes as round(x * 2^FRAC_BITS) mod 2^64 (two's complement for negatives); a sum of encodings
decodes by reading it as a signed 64-bit integer and dividing by 2^FRAC_BITS. The decoded sum is exact
to n * 2^-(FRAC_BITS+1) (each value rounds by at most half a step) as long as the true sum stays
within +-2^(63 - FRAC_BITS): `encode` refuses any value above `max_abs(n)` = 2^(63 - FRAC_BITS) / n, so
no sum of n of them can wrap around.
"""
from __future__ import annotations

import numpy as np

from offsite.errors import InvalidUpdateError

FRAC_BITS = 24          # resolution 6e-8; with 1,000 clients each value may be up to 5.5e5


def max_abs(n: int) -> float:
    return 2.0 ** (63 - FRAC_BITS) / n


def encode(values: np.ndarray, n: int) -> np.ndarray:
    """float64 values -> uint64 fixed point; `n` is how many encodings will be summed at most."""
    values = np.asarray(values, dtype=np.float64)
    bound = max_abs(n)
    if values.size and not np.isfinite(values).all():
        raise InvalidUpdateError("secure aggregation input has non-finite values")
    if values.size and float(np.abs(values).max()) >= bound:
        raise InvalidUpdateError(f"secure aggregation input exceeds {bound:.3g} in absolute value, the bound for {n} clients")
    return np.rint(values * 2.0 ** FRAC_BITS).astype(np.int64).view(np.uint64)


def decode(total: np.ndarray) -> np.ndarray:
    """A sum of encodings (uint64, already reduced mod 2^64) -> float64."""
    return np.asarray(total, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0 ** FRAC_BITS
