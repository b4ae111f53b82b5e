"""Held-out evaluation of several models on the same examples."""
from __future__ import annotations

from offsite import lm


def losses(models: dict, encoded: list[list[int]], pad_id: int) -> dict[str, float]:
    """Mean token loss of each named model on the same encoded examples."""
    return {name: round(lm.mean_token_loss(m, encoded, pad_id), 4) for name, m in models.items()}
