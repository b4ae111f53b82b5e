"""What `offsite cloud status` and the status page show: one dict, read from the coordinator's state."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING

from offsite.cloud import privacy
from offsite.cloud.job import JobConfig
from offsite.cloud.state import UpdateRecord

if TYPE_CHECKING:
    from offsite.cloud.coordinator import Coordinator


def read_status(coordinator: Coordinator) -> dict:
    """Jobs (rounds, updates, rejections, client-reported training loss, final evaluation once done) and
    clients (activity, last seen, traffic). Rounds are counted from 0, as in the state database."""
    state = coordinator.state
    out = {"jobs": [], "clients": [{"id": c.client_id, "name": c.name, "last_seen": c.last_seen, "revoked": c.revoked_at is not None,
                                    "activity": c.activity, "bytes_in": c.bytes_in, "bytes_out": c.bytes_out}
                                   for c in state.clients()]}
    for job in state.jobs():
        cfg = JobConfig.from_json(job.config_json)
        updates = state.updates(job.job_id)
        report = coordinator.layout.jobs / job.job_id / "report.json"  # written by offsite.cloud.finalize
        out["jobs"].append({"job_id": job.job_id, "status": job.status, "round": job.round, "rounds": cfg.rounds,
                            "aggregator": cfg.aggregator, "uploads_in_progress": len(state.uploads(job.job_id, job.round)),
                            "privacy": privacy.summary(cfg.dp_config(), job.round),
                            "updates": [u.__dict__ for u in updates],
                            "rejected": [{"round": r, "client_id": c, "reason": why} for r, c, why in state.rejections(job.job_id)],
                            "train_loss": train_loss_by_round(updates),
                            "eval": json.loads(report.read_text())["eval"] if job.status == "done" and report.is_file() else None})
    return out


def train_loss_by_round(updates: list[UpdateRecord]) -> list[dict]:
    """Per round, the example-weighted mean of the training losses clients reported with their updates;
    rounds where none did are left out."""
    sums: dict[int, tuple[float, int, int]] = {}
    for u in updates:
        if u.train_loss is not None:
            total, weight, n = sums.get(u.round, (0.0, 0, 0))
            sums[u.round] = (total + u.train_loss * u.num_examples, weight + u.num_examples, n + 1)
    return [{"round": r, "loss": total / weight, "clients": n} for r, (total, weight, n) in sorted(sums.items())]
