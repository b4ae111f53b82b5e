"""One round's secure-aggregation run on the coordinator: the protocol's server side (offsite.secagg)
plus when each stage closes.

A stage closes as soon as every client it waits for has answered, or when `timeout_s` has passed since
it opened with at least t answers (stage 1, the roster, waits like a plain round: for
`clients_per_round` adverts, or for `min_clients` at the deadline). The threshold t is fixed when the
roster closes: the job's, or a majority of the roster. A stage left below t aborts the run. The run
lives in memory only: a coordinator restart mid-run aborts it (see offsite.cloud.round_control).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from offsite.errors import AbortedError
from offsite.secagg.protocol import Advert, Reveal, SealedShares, SecAggServer, context

STAGES = {1: "ADVERTISE", 2: "SHARE_KEYS", 3: "MASK", 4: "UNMASK", 5: "DONE"}


@dataclass
class SecureRound:
    job_id: str
    round: int
    expected: int          # clients_per_round: adverts that close the roster at once
    minimum: int           # fewest adverts the roster may close with at its deadline
    threshold: int         # the job's t, or 0 for a majority of the roster
    length: int
    timeout_s: float
    opened_at: float
    server: SecAggServer = field(init=False)
    aborted: str | None = None
    result: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.server = SecAggServer(context(self.job_id, self.round), 0, self.length, max_clients=self.expected)

    @property
    def stage(self) -> int:
        return self.server.stage

    def raise_if_aborted(self) -> None:
        if self.aborted:
            raise AbortedError(self.aborted)

    def advert(self, a: Advert, now: float) -> None:
        if not self.server.adverts:
            self.opened_at = now
        self.raise_if_aborted()
        self.server.add_advert(a)

    def shares(self, sender: str, sealed: list[SealedShares]) -> None:
        self.raise_if_aborted()
        self.server.add_shares(sender, sealed)

    def masked(self, client_id: str, y: np.ndarray) -> None:
        self.raise_if_aborted()
        self.server.add_masked(client_id, y)

    def reveal(self, r: Reveal) -> None:
        self.raise_if_aborted()
        self.server.add_reveal(r)

    def advance(self, now: float) -> None:
        """Close every stage that is due; on too few clients, record why and stop."""
        s = self.server

        def due() -> bool:
            return now >= self.opened_at + self.timeout_s
        try:
            if s.stage == 1 and s.adverts and (len(s.adverts) >= self.expected or due() and len(s.adverts) >= self.minimum):
                s.threshold = self.threshold or len(s.adverts) // 2 + 1
                s.close_adverts()
                self.opened_at = now
            if s.stage == 2 and (len(s.shares) == len(s.adverts) or due()):
                s.close_shares()
                self.opened_at = now
            if s.stage == 3 and (len(s.masked) == len(s.shares) or due()):
                s.close_masked()
                self.opened_at = now
            if s.stage == 4 and (len(s.reveals) == len(s.masked) or due()):
                self.result = s.unmask()
        except AbortedError as e:
            self.aborted = str(e)
