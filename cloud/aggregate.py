"""Federated averaging, streamed: a running weighted sum holds one update in memory at a time."""
from __future__ import annotations

from typing import Iterable

import torch

from offsite.errors import InvalidUpdateError


class FedAvg:
    """Weighted mean of client adapters (McMahan et al. 2017), weights = training examples."""

    def __init__(self) -> None:
        self._sum: dict[str, torch.Tensor] | None = None
        self._weight = 0.0

    def add(self, tensors: dict[str, torch.Tensor], weight: float) -> None:
        if weight <= 0:
            raise InvalidUpdateError(f"update weight must be positive, got {weight}")
        if self._sum is None:
            self._sum = {k: v.double() * weight for k, v in tensors.items()}
        else:
            for k, v in tensors.items():
                self._sum[k].add_(v.double(), alpha=weight)
        self._weight += weight

    def result(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The mean, cast back to the dtypes of `like` (the skeleton)."""
        if self._sum is None:
            raise InvalidUpdateError("no updates to aggregate")
        return {k: (v / self._weight).to(like[k].dtype) for k, v in self._sum.items()}


def fedavg(updates: Iterable[tuple[dict[str, torch.Tensor], float]], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    agg = FedAvg()
    for tensors, weight in updates:
        agg.add(tensors, weight)
    return agg.result(like)
