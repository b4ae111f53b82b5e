"""A LoRA job's dense global adapter, exported as a standard PEFT LoRA adapter on the full model's own
layer indices: PeftModel.from_pretrained on the untouched base gives the plug-in's logits."""
import dataclasses
import json

import pytest
import torch
from peft import PeftModel

from offsite.emulator import methods
from offsite.emulator.build import make_emulator
from offsite.emulator.methods import MethodConfig
from offsite.emulator.peft_export import REPORT, export_peft
from offsite.errors import ConfigError
from tests.test_families import IDS, tiny
from tests.test_methods import PLAN, _randomize, initial

CLIENTS = 3  # updates merged into the global adapter, as one round of three clients


def _global_adapter(family: str, cfg: MethodConfig) -> dict[str, torch.Tensor]:
    """What the coordinator holds after a round: the mean of the adapters each client's update proposes."""
    start = initial(make_emulator(tiny(family), PLAN), cfg)
    trained, _ = methods.attach(methods.apply(make_emulator(tiny(family), PLAN), PLAN, cfg, start), PLAN, cfg)
    update = methods.trainable_state(trained, PLAN, cfg)
    proposals = [methods.propose(make_emulator(tiny(family), PLAN), PLAN, cfg, start, _randomize(update, seed))
                 for seed in range(CLIENTS)]
    return {k: sum(p[k] for p in proposals) / CLIENTS for k in start}


@pytest.mark.parametrize("family, name", [("llama", "lora"), ("gpt2", "lora"), ("opt", "lora"), ("llama", "adalora")])
def test_the_peft_adapter_gives_the_plug_ins_logits(family, name, tmp_path):
    cfg = MethodConfig(name, r=2, target_r=2)
    adapter = _global_adapter(family, cfg)
    result = export_peft(tiny(family), PLAN, adapter, tmp_path / "peft", rank=cfg.r * CLIENTS, base_name="tiny")
    assert result.max_relative_error < 1e-5 and result.rank == 6
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["layers_to_transform"]) == (6, 6, [0, 1, 4, 5])
    served = PeftModel.from_pretrained(tiny(family), str(tmp_path / "peft")).eval()
    plugged = methods.apply(tiny(family), PLAN, cfg, adapter, on_emulator=False).eval()
    with torch.no_grad():
        want, got = plugged(input_ids=IDS).logits, served(input_ids=IDS).logits
        assert not torch.allclose(want, tiny(family)(IDS).logits, atol=1e-3)  # the adapter does change the model
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "peft" / REPORT).read_text())["layers"]  # which layers carry factors, and the error


def test_a_rank_below_the_changes_says_how_far_off_it_is(tmp_path):
    cfg = MethodConfig("lora", r=2)
    result = export_peft(tiny("llama"), PLAN, _global_adapter("llama", cfg), tmp_path / "peft", rank=1, base_name="tiny")
    assert result.max_relative_error > 0.05


def test_what_lora_cannot_say_is_refused(tmp_path):
    adapter = initial(make_emulator(tiny("llama"), PLAN), MethodConfig())
    with pytest.raises(ConfigError, match="no change"):
        export_peft(tiny("llama"), PLAN, adapter, tmp_path / "a", rank=4, base_name="tiny")
    norm = next(k for k in adapter if "norm" in k)
    adapter[norm] = adapter[norm] + 0.5  # what the full-block or BitFit method changes
    with pytest.raises(ConfigError, match="not a linear layer"):
        export_peft(tiny("llama"), PLAN, adapter, tmp_path / "b", rank=4, base_name="tiny")
    with pytest.raises(ConfigError, match="rank"):
        export_peft(tiny("llama"), PLAN, adapter, tmp_path / "c", rank=0, base_name="tiny")
    extras = dataclasses.replace(PLAN, extras=("model.norm.weight",))
    with pytest.raises(ConfigError, match=r"trains \['model.norm.weight'\] beyond its blocks .* export it merged"):
        export_peft(tiny("llama"), extras, adapter, tmp_path / "d", rank=4, base_name="tiny")


@pytest.mark.parametrize("error, rank, widest, says", [
    (2e-7, 8, 64, "exact to rounding; loaded with peft, the base gives the merged export's outputs"),
    (4.64e-2, 8, 64, "close: the rank-8 factors hold almost all of the change; outputs differ slightly from the merged "
                     "export (--rank 16 (up to 64) makes it closer, or export --format merged (exact))"),
    (0.3, 64, 64, "approximate: rank 64 leaves out part of the change, and outputs may differ from the merged export; "
                  "export --format merged is exact"),
])
def test_the_factor_error_is_said_with_what_it_means(error, rank, widest, says):
    from offsite.cloud.exports import factor_verdict
    assert factor_verdict(error, rank, widest).endswith(says)
