"""Server-side aggregation: a streamed weighted mean of client adapters, then a strategy's update rule.

The mean holds one float64 running sum, so memory stays flat however many updates a round has. A strategy
turns (global adapter, mean, its state) into the next global adapter; its state is float32 tensors so the
coordinator can store it as safetensors between rounds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar, Iterable, Protocol

import torch

from offsite.errors import ConfigError, InvalidUpdateError

Tensors = dict[str, torch.Tensor]


class WeightedMean:
    """Streaming weighted mean: a running sum (float64 unless told otherwise), one update in memory at a
    time. The coordinator sums a half-precision adapter in float32: half the memory of float64 (at 7 B,
    gigabytes), and its rounding is 2^16 times finer than the bf16 cast that follows."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self._sum: Tensors = {}
        self._weight = 0.0
        self._count = 0

    def add(self, tensors: Tensors, weight: float) -> None:
        """Add one update; `weight` is its number of training examples."""
        if not (math.isfinite(weight) and weight > 0):
            raise InvalidUpdateError(f"update weight must be positive and finite, got {weight}")
        if not self._count:
            self._sum = {k: torch.zeros_like(v, dtype=self.dtype) for k, v in tensors.items()}
        elif {k: v.shape for k, v in tensors.items()} != {k: v.shape for k, v in self._sum.items()}:
            raise InvalidUpdateError("update tensor names or shapes differ from the first update's")
        for k, v in tensors.items():
            self._sum[k].add_(v, alpha=weight)  # in place: no float64 copy of the whole update
        self._weight += weight
        self._count += 1

    @property
    def count(self) -> int:
        return self._count

    def result(self) -> Tensors:
        """The mean, in the sum's dtype (divided in place: no second copy; the sum is spent); the strategy
        casts it to the global adapter's dtypes."""
        if not self._count:
            raise InvalidUpdateError("no updates to aggregate")
        return {k: v.div_(self._weight) for k, v in self._sum.items()}


class Strategy(Protocol):
    """Server-side update rule, applied once per round to the round's mean."""

    name: ClassVar[str]

    def step(self, global_: Tensors, mean: Tensors, state: Tensors) -> tuple[Tensors, Tensors]:
        """New global adapter (in the dtypes of global_) and the strategy's new state (float32 tensors,
        safetensors-serialisable; empty dict for FedAvg)."""


@dataclass(frozen=True)
class FedAvg:
    """New global = the mean (McMahan et al. 2017)."""

    name: ClassVar[str] = "fedavg"

    def step(self, global_: Tensors, mean: Tensors, state: Tensors) -> tuple[Tensors, Tensors]:
        _check_names(global_, mean)
        return {k: mean[k].to(g.dtype) for k, g in global_.items()}, {}


@dataclass(frozen=True)
class FedAvgM:
    """Server momentum on the round's delta (Hsu et al. 2019): damps client drift on non-IID data."""

    name: ClassVar[str] = "fedavgm"
    server_lr: float = 1.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        _require_positive("server_lr", self.server_lr)
        _require_fraction("momentum", self.momentum)

    def step(self, global_: Tensors, mean: Tensors, state: Tensors) -> tuple[Tensors, Tensors]:
        _check_names(global_, mean)
        new, new_state = {}, {}
        for k, g in global_.items():
            g64 = g.double()
            v = self.momentum * _prior(state, "momentum/" + k, g64) + (mean[k].double() - g64)
            new[k] = (g64 + self.server_lr * v).to(g.dtype)
            new_state["momentum/" + k] = v.float()
        return new, new_state


@dataclass(frozen=True)
class FedAdam:
    """Adam on the round's delta (Reddi et al. 2021, "Adaptive Federated Optimization"), no bias
    correction, as in that paper; tau bounds the step where the second moment is tiny."""

    name: ClassVar[str] = "fedadam"
    server_lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        _require_positive("server_lr", self.server_lr)
        _require_fraction("beta1", self.beta1)
        _require_fraction("beta2", self.beta2)
        _require_positive("tau", self.tau)

    def step(self, global_: Tensors, mean: Tensors, state: Tensors) -> tuple[Tensors, Tensors]:
        _check_names(global_, mean)
        new, new_state = {}, {}
        for k, g in global_.items():
            g64 = g.double()
            delta = mean[k].double() - g64
            m = self.beta1 * _prior(state, "m/" + k, g64) + (1 - self.beta1) * delta
            v = self.beta2 * _prior(state, "v/" + k, g64) + (1 - self.beta2) * delta.square()
            new[k] = (g64 + self.server_lr * m / (v.sqrt() + self.tau)).to(g.dtype)
            new_state["m/" + k], new_state["v/" + k] = m.float(), v.float()
        return new, new_state


STRATEGIES: dict[str, type[FedAvg | FedAvgM | FedAdam]] = {cls.name: cls for cls in (FedAvg, FedAvgM, FedAdam)}


def make_strategy(name: str, **params: float) -> Strategy:
    """The strategy a job config names, with its parameters; every mistake is a ConfigError."""
    return from_registry(STRATEGIES, "aggregation strategy", name, params)


def from_registry(registry: dict[str, type], what: str, name: str, params: dict):
    """`registry[name](**params)`, with an unknown name or a bad parameter said as a ConfigError."""
    if name not in registry:
        raise ConfigError(f"unknown {what} {name!r}; known: {', '.join(registry)}")
    try:
        return registry[name](**params)
    except TypeError as e:  # an unknown parameter name, or a value that is not a number
        raise ConfigError(f"bad parameters for {what} {name!r}: {e}") from None


def fedavg(updates: Iterable[tuple[Tensors, float]], like: Tensors) -> Tensors:
    """One FedAvg round in a call: the weighted mean of `updates`, cast to the dtypes of `like`."""
    mean = WeightedMean()
    for tensors, weight in updates:
        mean.add(tensors, weight)
    return FedAvg().step(like, mean.result(), {})[0]


def _prior(state: Tensors, key: str, like: torch.Tensor) -> torch.Tensor:
    """A state tensor in float64; zeros on the first round, when there is no state yet."""
    return state[key].double() if key in state else torch.zeros_like(like)


def _check_names(global_: Tensors, mean: Tensors) -> None:
    if set(global_) != set(mean):
        raise InvalidUpdateError(f"mean tensor names differ from the global adapter's: "
                                 f"missing {sorted(set(global_) - set(mean))[:5]}, extra {sorted(set(mean) - set(global_))[:5]}")


def _require_positive(field: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{field} must be a positive finite number, got {value!r}")


def _require_fraction(field: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ConfigError(f"{field} must be in [0, 1), got {value!r}")


def cap_weights(weights: list[float], max_share: float) -> list[float]:
    """Bound how much one client can weigh in a round (McMahan et al. 2018 cap weights similarly in DP-FedAvg):
    the least capping w'_i = min(w_i, T) that keeps every share w'_i / sum(w') at or below max_share.

    Water-filling, in exact rationals (rounding can neither skip the answer nor divide by zero): with the k
    largest weights capped, T = max_share * rest / (1 - max_share * k), `rest` the sum of the others; the
    first k whose T is at least the (k+1)-th largest weight gives the answer.
    max_share >= 1 caps nothing. If n * max_share <= 1 (one update, or two at 0.5) no capping can meet the cap:
    every weight becomes the smallest one, the equal shares closest to it.
    """
    if not weights:
        raise InvalidUpdateError("no update weights to cap")
    for w in weights:
        if not (math.isfinite(w) and w > 0):
            raise InvalidUpdateError(f"update weight must be positive and finite, got {w}")
    _require_positive("max_share", max_share)
    if max_share >= 1:
        return [float(w) for w in weights]
    share = Fraction(max_share)
    if share * len(weights) <= 1:
        return [float(min(weights))] * len(weights)
    descending = sorted(map(Fraction, weights), reverse=True)
    rest = sum(descending)
    for k, w in enumerate(descending):  # stops by k = n - 1 at the latest, since n * max_share > 1
        cap = share * rest / (1 - share * k)
        if cap >= w:
            break
        rest -= w
    return [min(float(w), float(cap)) for w in weights]
