"""A job file's [tracking]: the coordinator writes the job's settings, rounds and evaluation as TensorBoard event
files, read back here with TensorBoard's own EventAccumulator. A failing tracker never fails a round or a job."""
import importlib.util
import json
import logging
import math
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.plugins.hparams.api_pb2 import Status

from offsite.cloud import finalize as finalize_module
from offsite.cloud.coordinator import Coordinator
from offsite.cloud.finalize import finalize_job
from offsite.cloud.identity import StateLayout, init_state
from offsite.cloud.job import JobConfig
from offsite.errors import ConfigError, InvalidUpdateError
from tests.test_rounds import _upload, make_world

log = logging.getLogger("offsite.cloud")


def _read(run_dir) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})  # 0: keep every event
    events.Reload()
    return events


def _scalars(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _texts(events: EventAccumulator, tag: str) -> dict[int, str]:
    return {e.step: e.tensor_proto.string_val[0].decode() for e in events.Tensors(f"{tag}/text_summary")}


def test_a_tracked_jobs_settings_rounds_and_evaluation_read_back_from_tensorboard(tiny_model, tmp_path):
    """Round 1 closes with all three updates, in the process that made the job; round 2 closes at its deadline
    with two, a third refused, after a restart (a second writer in the same run, as `serve` after `jobs create`).
    Steps are rounds from 1; the evaluation sits at the last round's step with the report's numbers."""
    texts, tasks = tmp_path / "validation.jsonl", tmp_path / "tasks.jsonl"
    texts.write_text("".join(json.dumps({"text": f"home {i} away {i % 3} home win"}) + "\n" for i in range(2)))
    tasks.write_text("".join(json.dumps({"prompt": f"home {i} away", "completion": f" {i % 3}"}) + "\n" for i in range(2)))
    logdir = tmp_path / "tensorboard"
    c, clock, clients, done = make_world(tiny_model, tmp_path, max_update_norm=1.0, max_length=32, tracking_logdir=str(logdir),
                                         eval_sets={"validation": str(texts)}, task_sets={"results": str(tasks)})
    for (client, signer), loss, examples in zip(clients, (2.0, 1.0, 4.0), (10, 30, 10)):
        _upload(c, client, signer, 0, train_loss=loss, examples=examples)
    assert c.job("j").round == 1

    restarted = Coordinator.open(c.layout.root, on_training_done=done.append, clock=clock)
    restarted.tick()
    n = sum(math.prod(shape) for shape, _ in c.job("j").artifacts.spec.values())
    _upload(restarted, *clients[0], 1, train_loss=3.0, examples=20)
    with pytest.raises(InvalidUpdateError, match="above the job.s bound"):
        _upload(restarted, *clients[1], 1, shift=2.0 / n ** 0.5)  # L2 norm 2: refused
    _upload(restarted, *clients[2], 1, examples=5)  # reports no loss: the mean is the first one's
    clock.t += 61
    restarted.tick()
    assert done == ["j"]
    finalize_job(restarted, "j", log)
    report = json.loads((restarted.layout.jobs / "j" / "report.json").read_text())

    assert len(list((logdir / "j").glob("events.out.tfevents.*"))) == 2  # one per process, neither overwritten
    events = _read(logdir / "j")
    assert _scalars(events, "train/loss") == [(1, pytest.approx(1.8)), (2, 3.0)]  # (2x10 + 1x30 + 4x10) / 50
    assert _scalars(events, "round/selected") == [(1, 3), (2, 3)]
    assert _scalars(events, "round/accepted") == [(1, 3), (2, 2)]
    assert _scalars(events, "round/rejected") == [(1, 0), (2, 1)]
    assert _scalars(events, "round/examples") == [(1, 50), (2, 25)]
    assert _scalars(events, "round/seconds") == [(1, 0), (2, 61)]
    assert "train/heldout_loss" not in events.Tags()["scalars"]  # no client reported one
    clients_table = _texts(events, "round/clients")
    assert "| c1 | 10 |" in clients_table[1] and "| c2 | 30 |" in clients_table[1]
    assert clients_table[2].startswith("deadline of 60 s passed with 2 updates") and "| c2 |" not in clients_table[2]

    assert report["eval"]["validation"] and report["task_accuracy"]["results"]
    for metric, table in (("loss", report["eval"]), ("exact_match", report["task_accuracy"])):
        for name, columns in table.items():
            for column, value in columns.items():
                assert _scalars(events, f"eval/{metric}/{name}/{column}") == [(2, pytest.approx(value, abs=1e-6))]
    eval_table = _texts(events, "eval/loss")[2]
    assert eval_table.splitlines()[0] == "| set | full_zero_shot | emulator_zero_shot | emulator_with_adapter | plug_in |"
    assert f"| validation | {report['eval']['validation']['full_zero_shot']} |" in eval_table

    settings = _texts(events, "job/settings")[0]
    assert "| clients_per_round | 3 |" in settings and "| method | full |" in settings
    hparams = {tag: plugin_data_pb2.HParamsPluginData.FromString(content)
               for tag, content in events.PluginTagToContent("hparams").items()}
    started = hparams["_hparams_/session_start_info"].session_start_info.hparams
    assert started["lr"].number_value == pytest.approx(3e-3) and started["method"].string_value == "full"
    assert started["eval_sets.validation"].string_value == str(texts)
    assert started["pack"].string_value == "false" and started["tracking_logdir"].string_value == str(logdir)
    assert hparams["_hparams_/session_end_info"].session_end_info.status == Status.Value("STATUS_SUCCESS")
    assert "_hparams_/experiment" not in hparams  # one per run would hide every other job's HParams


@pytest.mark.parametrize("failure", ["disk", "package"])
def test_a_failing_tracker_is_warned_about_once_and_the_job_goes_on(tiny_model, tmp_path, monkeypatch, caplog, failure):
    """disk: every write fails (a full disk); package: the tracking extra is missing where the rounds close
    (`jobs create` ran where it is installed). Both rounds close and the job is done, with one warning."""
    c, clock, clients, done = make_world(tiny_model, tmp_path, rounds=2, tracking_logdir=str(tmp_path / "tb"))
    if failure == "disk":
        from torch.utils.tensorboard import SummaryWriter

        def full(*args, **kwargs):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(SummaryWriter, "add_scalar", full)
    else:
        c = Coordinator.open(c.layout.root, on_training_done=done.append, clock=clock)
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises ImportError
    monkeypatch.setattr(finalize_module, "finalize", lambda *args, **kwargs: {"rounds": 2, "eval": {}})
    c.tick()
    with caplog.at_level(logging.WARNING, logger="offsite.cloud"):
        for round_ in (0, 1):
            for client, signer in clients:
                _upload(c, client, signer, round_, train_loss=1.0)
        finalize_job(c, "j", log)
    assert done == ["j"] and c.job("j").status == "done"
    warnings = [r.getMessage() for r in caplog.records if "tracking" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert ("No space left on device" if failure == "disk" else "pip install 'offsite[tracking]'") in warnings[0]


@pytest.mark.parametrize("body, message", [
    ("[tracking]\n", "needs logdir"),
    ('[tracking]\nlogdir = ""\n', "needs logdir"),
    ("[tracking]\nlogdir = 3\n", "logdir must be a folder's path"),
    ('[tracking]\nlogdir = "tb"\nexperiment = "x"\n', r"unknown job settings \['tracking.experiment'\]"),
    ('[traking]\nlogdir = "tb"\n', r"unknown section\(s\) \[traking\]; a job file has .*\[tracking\]"),
])
def test_bad_tracking_settings(tmp_path, body, message):
    (tmp_path / "job.toml").write_text('[job]\nid = "j"\nbase_model = "gpt2"\n' + body)
    with pytest.raises(ConfigError, match=message):
        JobConfig.from_toml(tmp_path / "job.toml")


def test_tracking_is_off_by_default_and_its_folder_is_relative_to_the_job_file(tmp_path):
    (tmp_path / "job.toml").write_text('[job]\nid = "j"\nbase_model = "gpt2"\n')
    assert JobConfig.from_toml(tmp_path / "job.toml").tracking_logdir is None
    (tmp_path / "job.toml").write_text('[job]\nid = "j"\nbase_model = "gpt2"\n[tracking]\nlogdir = "runs/tb"\n')
    cfg = JobConfig.from_toml(tmp_path / "job.toml")
    assert cfg.tracking_logdir == str(tmp_path / "runs" / "tb")
    assert JobConfig.from_json(cfg.to_json()) == cfg


def test_a_tracked_job_is_refused_before_its_build_where_tensorboard_is_missing(tmp_path, monkeypatch):
    layout = StateLayout(tmp_path / "state")
    init_state(layout.root, ["c1"], ["localhost"], 3600)
    c = Coordinator.open(layout.root)
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "tensorboard" else found(name, *args))
    with pytest.raises(ConfigError, match=r"pip install 'offsite\[tracking\]'"):
        c.create_job(JobConfig(job_id="j", base_model=str(tmp_path / "no-such-model"), tracking_logdir=str(tmp_path / "tb")))
    assert c.state.jobs() == []
