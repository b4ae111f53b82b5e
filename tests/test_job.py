"""Job files: relative paths resolve against the file, bad values are named."""
import pytest

from offsite.cloud.job import JobConfig
from offsite.errors import ConfigError


def test_from_toml_resolves_paths(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "h.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "job.toml").write_text('[job]\nid = "j1"\nbase_model = "model"\nrounds = 3\n'
                                       '[eval]\nsets = { a = "h.jsonl" }\n')
    cfg = JobConfig.from_toml(tmp_path / "job.toml")
    assert cfg.rounds == 3 and cfg.base_model == str(tmp_path / "model")
    assert cfg.eval_sets == {"a": str(tmp_path / "h.jsonl")}
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
    assert (cfg.min_clients, cfg.round_timeout_s) == (2, 1800)


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
