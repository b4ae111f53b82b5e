"""DP-FedAvg: clipping, noise from a CSPRNG on only the tensors a method changes, the accountant, and the
coordinator's round under a [privacy] job."""
import math

import pytest
import torch

from offsite import csprng
from offsite.cloud.job import JobConfig
from offsite.cloud.privacy import ClippedNoisedMean, DPConfig, epsilon, summary
from offsite.emulator import methods
from offsite.emulator.methods import MethodConfig
from offsite.errors import ConfigError, InvalidUpdateError
from offsite.tensors import clip, from_bytes
from tests.test_rounds import _upload, make_world


def test_keystream_is_repeatable_per_seed_and_independent_per_stream():
    seed = bytes(range(32))
    assert csprng.keystream(seed, 64) == csprng.keystream(seed, 64)
    assert csprng.keystream(seed, 64, stream=1) != csprng.keystream(seed, 64)
    assert csprng.keystream(csprng.new_seed(), 64) != csprng.keystream(seed, 64)
    with pytest.raises(ValueError, match="32 bytes"):
        csprng.keystream(b"short", 8)


def test_gaussian_from_the_keystream_is_standard_normal():
    z = csprng.gaussian(csprng.new_seed(), 200_001)
    assert z.shape == (200_001,) and z.dtype == torch.float64
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert abs(float((z.abs() < 1.959964).double().mean()) - 0.95) < 0.003  # the two-sided 95% quantile


def test_clip_scales_only_long_changes():
    long = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}
    clipped, norm = clip(long, 1.0)
    assert norm == pytest.approx(5.0)
    assert math.sqrt(sum(float(v.pow(2).sum()) for v in clipped.values())) == pytest.approx(1.0)
    small = torch.tensor([0.3, 0.4], dtype=torch.float64)
    short, norm = clip({"a": small}, 1.0)
    assert norm == pytest.approx(0.5) and torch.equal(short["a"], small)


def test_accountant_spends_more_with_rounds_and_less_with_noise():
    cfg = DPConfig(clip=1.0, noise=1.0, delta=1e-5)
    eps = [epsilon(cfg, r) for r in (1, 3, 10)]
    assert eps[0] < eps[1] < eps[2]
    assert epsilon(DPConfig(clip=1.0, noise=2.0), 3) < eps[1]
    # Gaussian RDP composes to T*a/(2 z^2); the classic conversion is an upper bound on opacus' tighter one
    classic = min(3 * a / 2 + math.log(1e5) / (a - 1) for a in (1 + x / 100 for x in range(1, 5000)))
    assert 0.8 * classic < eps[1] <= classic
    assert epsilon(DPConfig(clip=1.0), 5) == math.inf and epsilon(cfg, 0) == 0.0
    assert summary(DPConfig(), 3) is None
    assert summary(cfg, 2)["epsilon_by_round"] == [eps[0], epsilon(cfg, 2)]


@pytest.mark.parametrize("kwargs", [dict(noise=1.0), dict(clip=-1.0), dict(clip=1.0, delta=0.0), dict(clip=1.0, delta=1.0)])
def test_bad_dp_settings(kwargs):
    with pytest.raises(ConfigError):
        DPConfig(**kwargs)


def test_privacy_table_in_a_job_file(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[job]\nid = "j"\nbase_model = "x"\n[privacy]\nclip = 0.5\nnoise = 1.1\ndelta = 1e-6\n')
    assert JobConfig.from_toml(path).dp_config() == DPConfig(clip=0.5, noise=1.1, delta=1e-6)
    path.write_text('[job]\nid = "j"\nbase_model = "x"\n[privacy]\nnoise = 1.1\n')
    with pytest.raises(ConfigError, match="clip"):
        JobConfig.from_toml(path)


def _start():
    return {"w": torch.zeros(400, 250), "frozen": torch.ones(10)}


def test_noise_has_the_promised_scale_and_spares_frozen_tensors():
    cfg = DPConfig(clip=2.0, noise=0.5)
    mean = ClippedNoisedMean(_start(), cfg, {"w"})
    for shift in (0.001, 0.002, 1.0):  # over 100,000 entries: norms 0.32, 0.63 and 316, past the clip
        mean.add({"w": torch.full((400, 250), shift), "frozen": torch.ones(10)}, weight=1000.0)
    quiet = ClippedNoisedMean(_start(), DPConfig(clip=2.0), {"w"})
    for shift in (0.001, 0.002, 1.0):
        quiet.add({"w": torch.full((400, 250), shift), "frozen": torch.ones(10)})
    expected = (0.001 + 0.002 + 2.0 / 316.2278) / 3  # norms 0.32 and 0.63 pass; 316 is clipped to 2; equal weights
    torch.testing.assert_close(quiet.result()["w"], torch.full((400, 250), expected, dtype=torch.float64))
    noised = mean.result()
    assert torch.equal(noised["frozen"], torch.ones(10, dtype=torch.float64))
    deviation = (noised["w"] - quiet.result()["w"]) * 3 / (cfg.noise * cfg.clip)  # the noise, in units of z*C
    assert abs(float(deviation.std()) - 1) < 0.02 and abs(float(deviation.mean())) < 0.02
    assert mean.norms[2] == pytest.approx(316.2278, rel=1e-4)


def test_an_update_that_moves_a_tensor_its_method_cannot_is_refused():
    mean = ClippedNoisedMean(_start(), DPConfig(clip=1.0), {"w"})
    with pytest.raises(InvalidUpdateError, match="frozen"):
        mean.add({"w": torch.zeros(400, 250), "frozen": torch.zeros(10)})


def test_lora_touches_the_weights_its_modules_sit_on():
    names = ["model.layers.0.self_attn.q_proj.lora_A.weight", "model.layers.0.self_attn.q_proj.lora_B.weight",
             "model.layers.4.mlp.up_proj.lora_E", "model.layers.5.mlp.down_proj.ia3_l"]
    assert methods.touched(MethodConfig("lora"), names) == {
        "model.layers.0.self_attn.q_proj.weight", "model.layers.4.mlp.up_proj.weight", "model.layers.5.mlp.down_proj.weight"}
    assert methods.touched(MethodConfig("bitfit"), ["a.bias"]) == {"a.bias"}


def test_a_dp_round_through_the_coordinator(tiny_model, tmp_path):
    """Clipped to C with equal weights (plain FedAvg would weight by examples and follow the far client)."""
    c, _, clients, _ = make_world(tiny_model, tmp_path, rounds=1, dp_clip=1.0)
    start = from_bytes(c.blobs.get(c.state.global_adapters("j")[0]))
    n = sum(v.numel() for v in start.values())
    for (client, signer), shift in zip(clients, (1e-4, 2e-4, 1.0)):
        _upload(c, client, signer, 0, shift=shift)
    new = from_bytes(c.blobs.get(c.state.global_adapters("j")[1]))
    norms = c.job("j").artifacts.dp_norms[0]
    assert norms == pytest.approx([1e-4 * n ** 0.5, 2e-4 * n ** 0.5, n ** 0.5], rel=1e-3)
    expected = (1e-4 + 2e-4 + 1.0 / n ** 0.5) / 3
    for k, v in new.items():
        torch.testing.assert_close(v - start[k], torch.full_like(v, expected), atol=1e-6, rtol=1e-4)
