"""Which clients train a round: seats filled from the roster in a seeded order, recorded in the state.

A round has `JobConfig.seats()` seats. They fill as clients ask for work (a client that enrolls
mid-round can take a free seat), and a selected client that goes quiet without an update stops holding
its seat, so another takes it; the quiet one stays selected and its update still counts if it comes.
The order in which candidates take seats is a hash of (seed, job, round, client): reproducible, the same
in every coordinator process, and no client can choose it. The selection is stored (`selections`), so
a restarted coordinator keeps the clients it chose.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass


def ranked(seed: int, job_id: str, round_: int, client_ids: list[str]) -> list[str]:
    """The candidates in the order they take seats this round."""
    def key(client_id: str) -> bytes:
        return hashlib.sha256(f"{seed}\x00{job_id}\x00{round_}\x00{client_id}".encode()).digest()
    return sorted(client_ids, key=key)


@dataclass(frozen=True)
class Seats:
    """What a round's selection needs now."""
    holding: tuple[str, ...]   # selected clients that hold a seat: an update is in, or they were seen lately
    free: int                  # seats to fill


def seats(total: int, selected: tuple[str, ...], with_update: set[str], last_seen: dict[str, float],
          now: float, quiet_s: float) -> Seats:
    """Seats held and free: a selected client holds its seat while its update is in or it was seen within
    `quiet_s` (a training client heartbeats well within that)."""
    holding = tuple(c for c in selected if c in with_update or now - last_seen.get(c, 0.0) <= quiet_s)
    return Seats(holding, max(0, total - len(holding)))
