"""What runs where is decided by running it: the README's table is the probe's output over every family."""
import re
from pathlib import Path

import torch

from offsite.emulator import methods, support

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_table_is_what_the_probe_finds_now():
    text = README.read_text()
    committed = re.search(r"<!-- support:begin[^\n]*-->\n(.*?)<!-- support:end -->", text, re.S).group(1)
    fresh = support.markdown(support.matrix({f: support.tiny(f) for f in support.FAMILIES}))
    assert committed == fresh, "README's method support table is stale: regenerate it with `offsite emulator support --markdown`"


def test_a_method_that_fails_on_a_model_is_reported_with_its_cause(monkeypatch):
    """A model whose attention refuses outside keys and values: prefix tuning fails there with the cause,
    the other methods (prompt tuning included, which only adds input embeddings) still run."""
    from transformers.models.llama import modeling_llama
    original = modeling_llama.LlamaAttention.forward

    def refusing(self, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5.x renames it to cache
        if cache is not None and cache.get_seq_length(self.layer_idx) > 0:
            raise RuntimeError("no outside keys here")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", refusing)
    model = support.tiny("llama")
    row = support.matrix({"llama": model})["llama"]
    assert row["prefix"] == "RuntimeError: no outside keys here"
    assert [m for m, why in row.items() if why is None] == [m for m in methods.METHODS if m != "prefix"]
    assert "| llama | yes | yes | yes | yes | yes | yes | **no** | yes |" in support.markdown({"llama": row})


def test_the_check_leaves_the_model_as_it_was():
    model = support.tiny("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert support.check(model, "lora") is None
    assert model.config.num_hidden_layers == support.L
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_command_checks_a_model_folder_and_prints_no_third_party_noise(tiny_model):
    """`offsite emulator support --model PATH` on the project's tiny LLaMA; bitsandbytes' warning about a kernel
    it could not fetch from the hub (printed on CPUs with avx512_bf16) is quieted (offsite.logs.QUIETED)."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "offsite.cli", "emulator", "support", "--model", str(tiny_model), "--markdown"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[2] == "| llama | yes | yes | yes | yes | yes | yes | yes | yes |"
    assert "kernels-community" not in done.stderr and "Traceback" not in done.stderr
