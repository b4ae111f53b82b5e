"""Differential privacy for the global adapter: DP-FedAvg (McMahan et al., 2018).

Each client's change to the round's adapter is clipped to L2 norm C, the clipped changes are summed
with equal weights (an example count would let one client outweigh the clip), Gaussian noise of
standard deviation z*C is added to the sum, and the sum is divided by the number of updates. One client
then moves the noised sum by at most C, so each round is a Gaussian mechanism with noise multiplier z
(no subsampling is assumed: every client that trains is counted). The Rényi-DP accountant is opacus'.
Noise is drawn from a ChaCha20 keystream (offsite.csprng), not torch's generator, and only on the
tensors the method can change: noise on frozen tensors would only damage the model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from offsite import csprng
from offsite.tensors import clip
from offsite.errors import ConfigError, InvalidUpdateError

Tensors = dict[str, torch.Tensor]
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # opacus' default Rényi orders


@dataclass(frozen=True)
class DPConfig:
    clip: float = 0.0       # C: L2 bound on each client's change (0: no clipping, no DP)
    noise: float = 0.0      # z: noise std on the sum, in units of C (0: clipping only, no privacy guarantee)
    delta: float = 1e-5     # the delta that epsilon is reported for

    def __post_init__(self) -> None:
        if self.clip < 0 or self.noise < 0:
            raise ConfigError(f"dp clip and noise must be >= 0, got {self.clip} and {self.noise}")
        if self.noise and not self.clip:
            raise ConfigError("dp noise needs a clip bound: the noise is scaled to it")
        if not 0 < self.delta < 1:
            raise ConfigError(f"dp delta must be in (0, 1), got {self.delta}")

    @property
    def enabled(self) -> bool:
        return self.clip > 0


def epsilon(cfg: DPConfig, rounds: int) -> float:
    """The epsilon (at `cfg.delta`) that `rounds` noised rounds have spent; inf without noise."""
    if not cfg.noise:
        return float("inf")
    if rounds <= 0:
        return 0.0
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent  # opacus imports in seconds
    rdp = compute_rdp(q=1.0, noise_multiplier=cfg.noise, steps=rounds, orders=ORDERS)
    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=cfg.delta)
    return float(eps)


def summary(cfg: DPConfig, rounds: int) -> dict | None:
    """What status and the report show: the settings and the epsilon spent after each closed round
    (None: no noise, so no guarantee). None when DP is off."""
    if not cfg.enabled:
        return None
    spent = [epsilon(cfg, r) if cfg.noise else None for r in range(1, rounds + 1)]
    return {"clip": cfg.clip, "noise_multiplier": cfg.noise, "delta": cfg.delta,
            "epsilon": (spent[-1] if spent else 0.0) if cfg.noise else None, "epsilon_by_round": spent}


def describe(summary: dict) -> str:
    """One line for people (`cloud status`, the status page) from a `summary` dict."""
    spent = ("no guarantee (no noise)" if summary["noise_multiplier"] == 0
             else f"epsilon {summary['epsilon']:.3g} at delta {summary['delta']:g} so far")
    return f"DP-FedAvg: clip {summary['clip']:g}, noise multiplier {summary['noise_multiplier']:g}: {spent}"


class ClippedNoisedMean:
    """The round's DP-FedAvg aggregate, streamed like WeightedMean: one update in memory at a time."""

    def __init__(self, start: Tensors, cfg: DPConfig, touched: set[str]) -> None:
        self.start, self.cfg, self.touched = start, cfg, sorted(touched)
        self._sum = {k: torch.zeros_like(start[k], dtype=torch.float64) for k in self.touched}
        self.count = 0
        self.norms: list[float] = []  # before clipping, for the operator

    def add(self, proposal: Tensors, weight: float = 1.0) -> None:
        """Add the adapter one client proposes; `weight` is ignored (equal weights, see the module)."""
        stray = [k for k in proposal if k not in self._sum and not torch.equal(proposal[k], self.start[k])]
        if stray:
            raise InvalidUpdateError(f"update changes tensors its method cannot: {stray[:3]}")
        clipped, norm = clip({k: proposal[k].double() - self.start[k].double() for k in self.touched}, self.cfg.clip)
        for k, v in clipped.items():
            self._sum[k].add_(v)
        self.norms.append(norm)
        self.count += 1

    def result(self, seed: bytes | None = None) -> Tensors:
        """start + (sum of clipped changes + N(0, (zC)^2)) / count, float64, over every tensor of start."""
        if not self.count:
            raise InvalidUpdateError("no updates to aggregate")
        noisy = add_noise(self._sum, self.cfg, seed)
        return {k: v.double() + noisy[k] / self.count if k in noisy else v.double() for k, v in self.start.items()}


def add_noise(sums: Tensors, cfg: DPConfig, seed: bytes | None = None) -> Tensors:
    """`sums` (float64) with N(0, (zC)^2) added to every entry, from a fresh keystream unless `seed` is given."""
    if not cfg.noise:
        return sums
    seed = seed or csprng.new_seed()
    return {k: v + cfg.noise * cfg.clip * csprng.gaussian(seed, v.numel(), stream).reshape(v.shape)
            for stream, (k, v) in enumerate(sorted(sums.items()))}
