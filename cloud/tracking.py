"""Experiment tracking where users already look: a job's settings, rounds and final evaluation as TensorBoard
event files, for a job whose file has a [tracking] section (off by default).

Each tracked job is one TensorBoard run, `<logdir>/<job id>`. The run's steps are round numbers counted from 1,
as in every log line. Step 0 holds the settings, which are also the run's HParams. Each closed round adds the
clients' mean training loss and the round's counts. The evaluation is logged at the last round's step. Tracking
never fails a round or a job: a tracker that fails is warned about once and dropped. torch.utils.tensorboard,
and with it the optional tensorboard package (`pip install 'offsite[tracking]'`), is imported only for a tracked
job, so commands that load no job stay fast.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from offsite.cloud.job import JobConfig
from offsite.cloud.status import loss_by_round
from offsite.errors import ConfigError

if TYPE_CHECKING:
    from offsite.cloud.state import State

log = logging.getLogger("offsite.cloud")
SETTINGS_STEP = 0  # the settings come before round 1


@dataclass(frozen=True)
class RoundMetrics:
    """A closed round as the state records it."""
    round: int                   # counted from 1
    selected: int                # clients selected to train it
    accepted: int                # updates counted in it
    rejected: int                # updates refused in it (and a secure run's refused aggregate)
    train_loss: float | None     # the example-weighted mean of the training losses clients reported; None: none did
    heldout_loss: float | None   # the same for the received adapter's loss on their held-out data
    examples: dict[str, int]     # client name -> the examples its counted update claims
    seconds: float               # from the round's opening to its close
    reason: str                  # why it closed, as the round log says


class Tracker(Protocol):
    """Where one job's tracking goes; Tracking guards every call."""

    def job_started(self, cfg: JobConfig) -> None: ...
    def round_closed(self, metrics: RoundMetrics) -> None: ...
    def finished(self, report: dict) -> None: ...


class TensorBoardTracker:
    """A job's run in `run_dir`, written by torch.utils.tensorboard. Every call ends with a flush, which writes
    the events to disk at once (unlike tensorboardX's). The job may be created by a process that exits next
    (`offsite cloud jobs create`), and `serve` may be killed. Each writer opens a file of its own, named after
    its host and process, so writers in two processes add to one run without overwriting each other."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tracking extra: only a tracked job gets here
        self._writer = SummaryWriter(str(run_dir))

    def job_started(self, cfg: JobConfig) -> None:
        from torch.utils.tensorboard.summary import hparams
        settings = flat_settings(cfg)
        self._writer.add_text("job/settings", markdown_table(("setting", "value"), sorted(settings.items())), SETTINGS_STEP)
        # only the session's start: an experiment summary in one run would hide every other job's HParams
        _, session_start, _ = hparams(settings, {})
        self._writer.file_writer.add_summary(session_start, SETTINGS_STEP)
        self._writer.flush()

    def round_closed(self, metrics: RoundMetrics) -> None:
        step = metrics.round
        for tag, value in (("train/loss", metrics.train_loss), ("train/heldout_loss", metrics.heldout_loss),
                           ("round/selected", metrics.selected), ("round/accepted", metrics.accepted),
                           ("round/rejected", metrics.rejected), ("round/examples", sum(metrics.examples.values())),
                           ("round/seconds", metrics.seconds)):
            if value is not None:
                self._writer.add_scalar(tag, value, step)
        clients = markdown_table(("client", "examples"), sorted(metrics.examples.items()))
        self._writer.add_text("round/clients", f"{metrics.reason}\n\n{clients}", step)
        self._writer.flush()

    def finished(self, report: dict) -> None:
        """The report's evaluation (offsite.cloud.finalize) at the last round's step, as a scalar per set and
        model, and as the report's tables; then the HParams session's end."""
        from torch.utils.tensorboard.summary import hparams
        step = report["rounds"]
        for metric, table in (("loss", report["eval"]), ("exact_match", report.get("task_accuracy") or {})):
            for name, columns in table.items():
                for column, value in columns.items():
                    self._writer.add_scalar(f"eval/{metric}/{name}/{column}", value, step)
            if table:
                self._writer.add_text(f"eval/{metric}", grid(table), step)
        _, _, session_end = hparams({}, {})
        self._writer.file_writer.add_summary(session_end, step)
        self._writer.close()


class Tracking:
    """The coordinator's trackers, one per tracked job. A job without [tracking] costs nothing: no import
    and no state reads. A tracker that fails, for example because the tracking extra is missing where the
    coordinator runs or the disk is full, is dropped after one warning: tracking never fails a round or a job."""

    def __init__(self) -> None:
        self._trackers: dict[str, Tracker | None] = {}  # job id -> its tracker; None: dropped after a failure
        self._lock = threading.Lock()  # the round worker and finalization threads call in

    def job_started(self, cfg: JobConfig) -> None:
        self._call(cfg, lambda tracker: tracker.job_started(cfg))

    def round_closed(self, cfg: JobConfig, state: State, round_: int) -> None:
        """Record the job's round `round_` (counted from 0, as the state does), which has just closed."""
        self._call(cfg, lambda tracker: tracker.round_closed(round_metrics(state, cfg.job_id, round_)))

    def finished(self, cfg: JobConfig, report: dict) -> None:
        self._call(cfg, lambda tracker: tracker.finished(report))
        with self._lock:
            self._trackers.pop(cfg.job_id, None)  # its files are closed; a job made again under its id starts anew

    def _call(self, cfg: JobConfig, record: Callable[[Tracker], None]) -> None:
        if cfg.tracking_logdir is None:
            return
        with self._lock:
            if cfg.job_id in self._trackers and self._trackers[cfg.job_id] is None:
                return
            try:
                if cfg.job_id not in self._trackers:
                    self._trackers[cfg.job_id] = TensorBoardTracker(Path(cfg.tracking_logdir) / cfg.job_id)
                record(self._trackers[cfg.job_id])
            except Exception as e:  # whatever the library or the disk raises: the round or the job goes on
                self._trackers[cfg.job_id] = None
                log.warning("job %s: tracking to %s failed, so it is off for this job from now on: %s: %s%s",
                            cfg.job_id, cfg.tracking_logdir, type(e).__name__, e,
                            " (install the tracking extra: pip install 'offsite[tracking]')"
                            if isinstance(e, ImportError) else "")


def check_available(cfg: JobConfig) -> None:
    """Refuse a tracked job at creation, before its emulator is built, when the tracking extra is missing:
    the person who asked for tracking is told now, not by a warning in the coordinator's log later."""
    if cfg.tracking_logdir is not None and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("[tracking] writes TensorBoard event files with the tensorboard package, which is not "
                          "installed: pip install 'offsite[tracking]'")


def round_metrics(state: State, job_id: str, round_: int) -> RoundMetrics:
    """Round `round_` (from 0) of the job, read from the state once it has closed."""
    rnd, updates = state.round(job_id, round_), state.updates(job_id, round_)
    names = {c.client_id: c.name for c in state.clients()}

    def mean(which: str) -> float | None:  # the status page's numbers: the same weighting and clamping
        by_round = loss_by_round(updates, which)
        return by_round[0]["loss"] if by_round else None

    return RoundMetrics(round=round_ + 1, selected=len(rnd.selected), accepted=len(updates),
                        rejected=sum(1 for r, _, _ in state.rejections(job_id) if r == round_),
                        train_loss=mean("train_loss"), heldout_loss=mean("heldout_loss"),
                        examples={names.get(u.client_id, u.client_id): u.num_examples for u in updates},
                        seconds=(rnd.closed_at or rnd.opened_at) - rnd.opened_at, reason=rnd.reason)


def flat_settings(cfg: JobConfig) -> dict[str, str | int | float]:
    """The job's settings as flat name -> value pairs, the types that TensorBoard HParams accept. Nested tables
    become dotted names, lists become JSON, booleans become true/false as in TOML, and unset settings are
    left out."""
    out: dict[str, str | int | float] = {}

    def put(name: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                put(f"{name}.{key}", inner)
        elif isinstance(value, bool):
            out[name] = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        elif value is not None:
            out[name] = value

    for name, value in asdict(cfg).items():
        put(name, value)
    return out


def markdown_table(header: tuple[str, ...], rows) -> str:
    """A Markdown table, as TensorBoard's text dashboard renders it (a chat template's '|' and newlines escaped)."""
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows])


def grid(table: dict[str, dict[str, float]]) -> str:
    """The report's {set: {model: value}} as a table with a row per set and a column per model."""
    columns = list(dict.fromkeys(column for values in table.values() for column in values))
    return markdown_table(("set", *columns), [(name, *(values.get(c, "") for c in columns)) for name, values in table.items()])
