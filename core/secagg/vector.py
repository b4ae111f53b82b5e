"""What a client's masked input holds, and how the coordinator reads the sum back.

A client's input is its weighted change to the round's global adapter, over the tensors its method can
change (sorted by name, each flattened), followed by the weight itself: the sum over clients is then
sum(w * change) and sum(w), and their ratio the weighted mean change, the same mean FedAvg takes. Under
DP the change is clipped first and every weight is 1.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from offsite.tensors import clip

MASKED = "masked"  # the one tensor of a masked-input upload


def length(shapes: dict[str, list[int]]) -> int:
    return sum(math.prod(s) for s in shapes.values()) + 1


def client_input(change: dict[str, torch.Tensor], weight: float, clip_bound: float = 0.0) -> tuple[np.ndarray, float]:
    """The float64 vector a client masks, and the change's L2 norm before any clipping."""
    names = sorted(change)
    clipped, norm = clip({k: change[k] for k in names}, clip_bound or math.inf)
    flat = [clipped[k].reshape(-1).numpy() * weight for k in names]
    return np.concatenate(flat + [np.array([weight], dtype=np.float64)]), norm


def read_sum(total: np.ndarray, shapes: dict[str, list[int]]) -> tuple[dict[str, torch.Tensor], float]:
    """The summed weighted changes (float64, by name) and the summed weight."""
    out, at = {}, 0
    for name in sorted(shapes):
        n = math.prod(shapes[name])
        out[name] = torch.from_numpy(total[at:at + n].copy()).reshape(shapes[name])
        at += n
    return out, float(total[at])
