"""What `offsite cloud status` and the status page show: one dict, read from the coordinator's state.

Numbers that clients reported only for monitoring (training losses) are clamped to what can be shown,
and the dict holds finite numbers only (None where there is no number), so it is always strict JSON."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from offsite.cloud import privacy
from offsite.cloud.job import JobConfig
from offsite.cloud.state import RoundRecord, UpdateRecord

if TYPE_CHECKING:
    from offsite.cloud.coordinator import Coordinator

LOSS_SHOWN_MAX = 1e6  # a client-reported training loss above this is shown as this (the wire refuses more)
SERVING_FRESH_S = 60.0  # an inference server's summary older than this is from one that stopped without removing it


def read_status(coordinator: Coordinator) -> dict:
    """Jobs (rounds, updates, rejections, client-reported training and held-out loss, final evaluation once
    done) and clients (activity, last seen, traffic). Rounds are counted from 1, as in every log line and
    command (the state database counts from 0); a job's `round` is the one in progress, or its last."""
    state = coordinator.state
    out = {"jobs": [], "clients": [{"id": c.client_id, "name": c.name, "last_seen": c.last_seen, "revoked": c.revoked_at is not None,
                                    "activity": c.activity, "bytes_in": c.bytes_in, "bytes_out": c.bytes_out}
                                   for c in state.clients()]}
    for job in state.jobs():
        cfg = JobConfig.from_json(job.config_json)
        updates = state.updates(job.job_id)
        report = coordinator.layout.jobs / job.job_id / "report.json"  # written by offsite.cloud.finalize
        counts: dict[int, int] = {}
        for u in updates:
            counts[u.round] = counts.get(u.round, 0) + 1
        out["jobs"].append({"job_id": job.job_id, "status": job.status, "round": min(job.round + 1, cfg.rounds),
                            "rounds": cfg.rounds, "rounds_closed": job.round,
                            "base_model": cfg.base_model, "method": cfg.method, "clients_per_round": cfg.clients_per_round,
                            "seats": cfg.seats(),
                            "round_log": [{"round": r.round + 1, "status": r.status, "selected": list(r.selected),
                                           "updates": counts.get(r.round, 0), "opened_at": r.opened_at,
                                           "closed_at": r.closed_at, "reason": r.reason} for r in state.rounds(job.job_id)],
                            "aggregator": cfg.aggregator, "uploads_in_progress": len(state.uploads(job.job_id, job.round)),
                            "privacy": privacy.summary(cfg.dp_config(), job.round),
                            "updates": [{**u.__dict__, "round": u.round + 1} for u in updates],
                            "rejected": [{"round": r + 1, "client_id": c, "reason": why} for r, c, why in state.rejections(job.job_id)],
                            "train_loss": loss_by_round(updates, "train_loss"),
                            "heldout_loss": loss_by_round(updates, "heldout_loss"),
                            "eval": json.loads(report.read_text())["eval"] if job.status == "done" and report.is_file() else None,
                            **round_eta(state.rounds(job.job_id), cfg.rounds, job.status, coordinator.now())})
    out["serving"] = serving_summaries(coordinator.layout.serving)
    return finite(out)


def serving_summaries(folder: Path, now: float | None = None) -> list[dict]:
    """What each running `offsite cloud infer` process last wrote (offsite.cloud.infer.api), by instance."""
    now = time.time() if now is None else now
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            continue   # being replaced, or not ours
        if isinstance(summary, dict) and now - float(summary.get("updated_at", 0)) <= SERVING_FRESH_S:
            out.append({"instance": path.stem, **summary})
    return out


def finite(value):
    """`value` (dicts, lists, numbers, strings) with every float that is not finite replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def loss_by_round(updates: list[UpdateRecord], which: str) -> list[dict]:
    """Per round (from 1), the example-weighted mean of the losses clients reported with their updates (`which`:
    train_loss, or heldout_loss: the received adapter's on their held-out data), each clamped to
    [0, LOSS_SHOWN_MAX] (finite whatever the counts); rounds where none did are left out."""
    by_round: dict[int, list[tuple[float, float]]] = {}
    for u in updates:
        reported = getattr(u, which)
        if reported is not None:
            loss = min(max(reported, 0.0), LOSS_SHOWN_MAX) if math.isfinite(reported) else LOSS_SHOWN_MAX
            by_round.setdefault(u.round + 1, []).append((loss, float(u.num_examples)))
    # clamped losses times counts below 2^64 stay far inside float range; the mean is clamped again for rounding
    return [{"round": r, "loss": min(math.fsum(loss * w for loss, w in pairs) / math.fsum(w for _, w in pairs), LOSS_SHOWN_MAX),
             "clients": len(pairs)} for r, pairs in sorted(by_round.items())]


def round_eta(rounds: list[RoundRecord], total: int, status: str, now: float) -> dict[str, float | None]:
    """"round_s": the mean time from opening to closing of the job's closed rounds; "eta_s": the seconds left
    until its last round closes, from that mean (the open round's time so far counted off; 0 once training is
    over). None where no round closed yet, or the job no longer trains; never negative."""
    spans = [max(r.closed_at - r.opened_at, 0.0) for r in rounds
             if r.closed_at is not None and r.opened_at > 0]  # a round made before the rounds table has no times
    round_s = math.fsum(spans) / len(spans) if spans else None
    open_ = [r for r in rounds if r.status == "open"]
    if rounds and not open_ and len(rounds) >= total:
        eta_s = 0.0
    elif status == "running" and open_ and round_s is not None:
        eta_s = max(round_s - (now - open_[0].opened_at), 0.0) + round_s * (total - open_[0].round - 1)
    else:
        eta_s = None
    return {"round_s": round_s, "eta_s": eta_s}


def describe_eta(job: dict) -> str | None:
    """A running job's round time and time left as `offsite cloud status` prints them (from round_eta)."""
    if job["status"] != "running" or job["eta_s"] is None:
        return None
    return f"rounds take {_duration(job['round_s'])} on average; training ends in about {_duration(job['eta_s'])}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"
