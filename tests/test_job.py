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
