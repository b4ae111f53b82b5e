"""Job files: relative paths resolve against the file, bad values are named."""
import pytest

from offsite.cloud.job import JobConfig
from offsite.errors import ConfigError


def test_from_toml_resolves_paths(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "h.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "job.toml").write_text('[job]\nid = "j1"\nbase_model = "model"\nrounds = 3\n'
                                       '[eval]\nsets = { a = "h.jsonl" }\ntasks = { a = "t.jsonl" }\n')
    cfg = JobConfig.from_toml(tmp_path / "job.toml")
    assert cfg.rounds == 3 and cfg.base_model == str(tmp_path / "model")
    assert cfg.eval_sets == {"a": str(tmp_path / "h.jsonl")} and cfg.task_sets == {"a": str(tmp_path / "t.jsonl")}
    assert JobConfig.from_json(cfg.to_json()) == cfg


def test_hub_id_is_kept(tmp_path):
    (tmp_path / "job.toml").write_text('[job]\nid = "j"\nbase_model = "gpt2"\n')
    assert JobConfig.from_toml(tmp_path / "job.toml").base_model == "gpt2"


@pytest.mark.parametrize("body, message", [
    ('[job]\nid = "j"\nbase_model = "m"\nrounds = 0\n', "rounds"),
    ('[job]\nid = "j j"\nbase_model = "m"\n', "job id"),
    ('[job]\nid = "j"\nbase_model = "m"\nfrobnicate = 1\n', "frobnicate"),
    ('[job\n', "job.toml"),
])
def test_bad_job_files(tmp_path, body, message):
    (tmp_path / "job.toml").write_text(body)
    with pytest.raises(ConfigError, match=message):
        JobConfig.from_toml(tmp_path / "job.toml")


def test_the_documented_example_job_parses():
    from pathlib import Path
    cfg = JobConfig.from_toml(Path(__file__).resolve().parents[1] / "docs" / "job.example.toml")
    assert (cfg.job_id, cfg.rounds, cfg.emulator_layers, cfg.strategy) == ("support-bot", 5, 8, "uniform")
    assert (cfg.min_clients, cfg.round_timeout_s) == (1, 1800)
    # a good first job for the README's two data owners: LoRA with the final norm and LM head, both in every round
    assert (cfg.method, cfg.train_extra, cfg.clients_per_round, cfg.report_heldout) == ("lora", ("norm", "head"), 2, False)
    assert cfg.method_params["r"] == 16 and set(cfg.eval_sets) == {"validation"}


def test_the_aggregation_section_splits_into_weights_rule_and_strategy(tmp_path):
    (tmp_path / "job.toml").write_text('[job]\nid = "j"\nbase_model = "m"\nclients_per_round = 8\n'
                                       '[aggregation]\nstrategy = "fedavgm"\nserver_lr = 0.5\ncombine = "multi_krum"\n'
                                       'byzantine = 2\nkeep = 3\nweighting = "equal"\nmax_weight_share = 0.25\n'
                                       'max_examples_per_client = 5000\n')
    cfg = JobConfig.from_toml(tmp_path / "job.toml")
    assert (cfg.aggregator, cfg.aggregator_params) == ("fedavgm", {"server_lr": 0.5})
    assert (cfg.combine, cfg.combine_params) == ("multi_krum", {"byzantine": 2, "keep": 3})
    assert (cfg.weighting, cfg.max_weight_share, cfg.max_examples_per_client) == ("equal", 0.25, 5000)
    assert JobConfig.from_json(cfg.to_json()) == cfg
    (tmp_path / "job.toml").write_text('[job]\nid = "j"\nbase_model = "m"\n[aggregation]\ncombine = "median"\ntrim = 0.1\n')
    with pytest.raises(ConfigError, match="trim"):  # median takes no trim: it lands with the strategy, which refuses it
        JobConfig.from_toml(tmp_path / "job.toml")


@pytest.mark.parametrize("kwargs, match", [(dict(prox_mu=-0.1), "prox_mu"), (dict(prox_mu=1e3), "prox_mu"),
                                           (dict(lr_schedule="cosine"), "lr_schedule")])
def test_fedprox_and_schedule_settings_are_bounded(tiny_model, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        JobConfig(job_id="j", base_model=str(tiny_model), **kwargs)


def test_the_client_takes_its_rounds_part_of_a_job_wide_schedule():
    from offsite.client.run import schedule_part
    assert schedule_part("job", 1, 4) == (0.25, 0.5) and schedule_part("round", 3, 4) == (0.0, 1.0)
    assert schedule_part("", 0, 1) == (0.0, 1.0)  # an older coordinator sends none
    for kind, round_, rounds in (("job", 4, 4), ("job", -1, 4), ("warm", 0, 4)):
        with pytest.raises(ConfigError, match="lr_schedule"):
            schedule_part(kind, round_, rounds)


def test_a_train_task_carries_the_fedprox_and_schedule_settings(tiny_model):
    from offsite.cloud.serde import task_message
    from offsite.cloud.tasks import Task
    cfg = JobConfig(job_id="j", base_model=str(tiny_model), prox_mu=0.1, lr_schedule="job")
    training = task_message(Task("train", "j", 1, 2, config=cfg)).training
    assert (training.prox_mu, training.lr_schedule) == (pytest.approx(0.1), "job")


@pytest.mark.parametrize("method, ok", [("full", True), ("lora", True), ("adalora", False), ("ia3", False), ("bitfit", False),
                                        ("prompt", False), ("bottleneck", False)])
def test_extras_train_in_full_or_through_lora(tiny_model, method, ok):
    make = lambda: JobConfig(job_id="j", base_model=str(tiny_model), train_extra=["norm", "head"], method=method)  # noqa: E731
    if ok:
        assert make().emulator_config().train_extra == ("norm", "head")
    else:
        with pytest.raises(ConfigError, match=f"needs method full or lora, not {method}"):
            make()


def test_a_misspelled_section_is_refused_by_name(tmp_path):
    """`[adaptor]` used to be ignored, and the job trained whole blocks instead of the LoRA it asked for."""
    (tmp_path / "job.toml").write_text('[job]\nid = "x"\nbase_model = "m"\n[adaptor]\nmethod = "lora"\n')
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \[adaptor\]; a job file has \[adapter\], \[aggregation\]"):
        JobConfig.from_toml(tmp_path / "job.toml")


@pytest.mark.parametrize("value, message", [
    ("../models/shopbot-bse", "no such folder {tmp}/models/shopbot-bse (relative paths are relative to the job file's"),
    ("./bases/none", "no such folder {tmp}/jobs/bases/none"),
    ("shop/base", "{tmp}/jobs/shop/base does not exist; {cwd}/shop/base does, but a job file's relative paths"),
])
def test_a_base_model_meant_as_a_folder_is_never_tried_as_a_hub_id(tmp_path, monkeypatch, value, message):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "cwd" / "shop" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    (tmp_path / "jobs" / "job.toml").write_text(f'[job]\nid = "x"\nbase_model = "{value}"\n')
    with pytest.raises(ConfigError) as e:
        JobConfig.from_toml(tmp_path / "jobs" / "job.toml")
    assert message.format(tmp=tmp_path.resolve(), cwd=(tmp_path / "cwd").resolve()) in str(e.value)


def test_a_hub_id_stays_a_hub_id(tmp_path):
    (tmp_path / "job.toml").write_text('[job]\nid = "x"\nbase_model = "Qwen/Qwen2.5-0.5B"\n')
    assert JobConfig.from_toml(tmp_path / "job.toml").base_model == "Qwen/Qwen2.5-0.5B"
