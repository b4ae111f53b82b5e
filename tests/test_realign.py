"""FedBiOT's re-alignment: the emulator's middle moves toward the full model's with the global adapter
plugged into both, and a client's emulator becomes exactly the model owner's by applying the patch."""
import pytest
import torch

from offsite import lm
from offsite.emulator import methods
from offsite.emulator.adapter import extract_adapter
from offsite.emulator.build import build, load_base
from offsite.emulator.bundle import load_bundle
from offsite.emulator.config import EmulatorConfig
from offsite.emulator.distill import DistillConfig
from offsite.emulator.realign import apply_patch, middle_names, realign
from offsite.errors import InvalidUpdateError
from offsite.textdata import read_texts
from tests.test_distill import _middle_error


@pytest.fixture()
def setup(tiny_model, client_data, tmp_path):
    """The bundle (keep 1 of 2 middle blocks), the full model, and a global adapter that moved away from the base."""
    bundle = build(str(tiny_model), EmulatorConfig(emulator_layers=1), tmp_path / "bundle", show_progress=False).bundle_dir
    full, tokenizer = load_base(str(tiny_model))
    emulator, _, plan = load_bundle(bundle)
    torch.manual_seed(0)
    adapter = {k: v + 0.05 * torch.randn_like(v) for k, v in extract_adapter(full, plan, on_emulator=False).items()}
    windows = lm.pack(lm.encode(tokenizer, read_texts(client_data[0] / "train.jsonl"), 10**9), 32)
    return bundle, full, emulator, plan, adapter, windows, tokenizer.pad_token_id


def test_realignment_moves_the_emulator_toward_the_full_model_with_the_adapter(setup, tiny_model):
    bundle, full, emulator, plan, adapter, windows, pad = setup
    method = methods.MethodConfig()
    before = _middle_error(methods.apply(load_base(str(tiny_model))[0], plan, method, adapter, on_emulator=False),
                           methods.apply(load_bundle(bundle)[0], plan, method, adapter), windows, pad)
    patch = realign(full, emulator, plan, method, adapter, windows, pad,
                    DistillConfig(steps=30, lr=3e-3, batch_size=8, seq_len=32), torch.float32)
    assert set(patch) == set(middle_names(emulator, plan))
    after = _middle_error(full, emulator, windows, pad)  # realign plugged the adapter into both in place
    assert after < 0.7 * before

    client = apply_patch(methods.apply(load_bundle(bundle)[0], plan, method, adapter), plan, patch)
    mine, theirs = client.state_dict(), emulator.state_dict()
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)  # bit for bit
    ids = torch.tensor(windows[:2])
    with torch.no_grad():
        assert torch.equal(client(ids).logits, emulator(ids).logits)


def test_a_patch_that_is_not_the_kept_middle_is_refused(setup):
    bundle, _, emulator, plan, _, _, _ = setup
    patch = {k: v.detach().clone() for k, v in emulator.named_parameters() if k in set(middle_names(emulator, plan))}
    name = next(iter(patch))
    cases = {
        "missing": {k: v for k, v in patch.items() if k != name},
        "unexpected": {**patch, "lm_head.weight": emulator.lm_head.weight.detach().clone()},
        "shape": {**patch, name: patch[name][:1]},
        "dtype": {**patch, name: patch[name].to(torch.bfloat16)},
    }
    before = {k: v.clone() for k, v in emulator.state_dict().items()}
    for why, bad in cases.items():
        with pytest.raises(InvalidUpdateError, match="emulator patch"):
            apply_patch(emulator, plan, bad)
        assert all(torch.equal(v, before[k]) for k, v in emulator.state_dict().items()), why  # nothing half-applied


@pytest.mark.parametrize("every, rounds, realigned", [
    (1, 3, [0, 1]),      # after rounds 1 and 2, not after the last
    (2, 5, [1, 3]),
    (3, 3, []),          # the third round is the last
    (0, 4, []),
])
def test_a_job_realigns_every_k_rounds_but_not_after_its_last(every, rounds, realigned):
    from offsite.cloud.job import Job, JobConfig
    from offsite.cloud.realign import due

    cfg = JobConfig(job_id="j", base_model="m", rounds=rounds, realign_every=every, distill_data="public.jsonl")
    assert [r for r in range(rounds) if due(Job("j", "running", r, cfg, None))] == realigned


@pytest.mark.parametrize("settings, why", [
    ({"realign_every": 1}, "realign_data"),
    ({"realign_every": 5, "distill_data": "d"}, "realign_every must be in 0..rounds"),
    ({"realign_every": 1, "realign_steps": 0, "distill_data": "d"}, "realign_steps"),
    ({"realign_every": 1, "realign_steps": 10**6, "distill_data": "d"}, "realign_steps"),
    ({"realign_every": 1, "distill_data": "d", "quantize": "nf4"}, "quantize"),
    ({"realign_every": 1, "distill_data": "d", "method": "prompt"}, "virtual-token"),
])
def test_realignment_settings_are_bounded(settings, why):
    from offsite.cloud.job import JobConfig
    from offsite.errors import ConfigError

    with pytest.raises(ConfigError, match=why):
        JobConfig(job_id="j", base_model="m", rounds=2, **settings)
