"""offsite.chunked_loss: the next-token loss a slice of positions at a time gives the loss and gradients
of the whole logits tensor, on every decoder family, and falls back where a model changes its logits
after the head; its peak memory is a slice of logits, not the batch's."""
import subprocess
import sys

import pytest
import torch

from offsite import chunked_loss
from tests.test_families import FAMILIES, V, tiny

IDS = torch.randint(3, V, (3, 12), generator=torch.Generator().manual_seed(2))
MASK = torch.ones_like(IDS)
LABELS = IDS.clone()
LABELS[0, :5] = chunked_loss.IGNORE  # a prompt, not scored
LABELS[2, 9:] = chunked_loss.IGNORE  # padding
SOFT_CAPPED = {"gemma2"}  # final_logit_softcapping: tanh after the head


def _loss_and_grads(model, fn):
    model.zero_grad()
    torch.manual_seed(5)  # the same dropout masks for both ways
    loss, n = fn()
    loss.backward()
    return float(loss), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sliced_loss_and_gradients_equal_the_whole_logits(family, monkeypatch):
    model = tiny(family).train()
    slices = []
    real = chunked_loss._slice_loss
    monkeypatch.setattr(chunked_loss, "_slice_loss", lambda *a: slices.append(a[1].shape[0]) or real(*a))
    monkeypatch.setattr(chunked_loss, "LOGIT_VALUES_PER_SLICE", 5 * V)  # 5 positions a slice
    want = _loss_and_grads(model, lambda: chunked_loss.next_token_loss_sum(model(input_ids=IDS, attention_mask=MASK).logits, LABELS))
    got = _loss_and_grads(model, lambda: chunked_loss.token_loss_sum(model, IDS, MASK, LABELS))
    assert got[1] == want[1] == 33 - 4 - 3  # 3 x 11 next tokens; 4 in the prompt and 3 in the padding are not scored
    assert got[0] == pytest.approx(want[0], rel=1e-5)
    assert got[2].keys() == want[2].keys()
    for name, grad in want[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    if family in SOFT_CAPPED:
        assert not slices  # the probe saw the tanh: the loss came from the whole logits
    else:
        assert sum(slices) == 2 * got[1] and max(slices) == 5  # each slice twice: forward, and the recompute in backward


def test_nothing_scored_is_a_zero_loss_that_still_backpropagates():
    model = tiny("llama").train()
    loss, n = chunked_loss.token_loss_sum(model, IDS, MASK, torch.full_like(IDS, chunked_loss.IGNORE))
    loss.backward()
    assert (float(loss), n) == (0.0, 0)


CHILD = r"""
import resource, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from offsite import chunked_loss
from offsite.memory import return_freed_memory
return_freed_memory()  # as a process holding a large half-precision model has it (offsite.precision.prepare)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2)).train()
ids = torch.randint(3, 64000, (4, 256))
mask = torch.ones_like(ids)
chunked_loss.token_loss_sum(model, ids[:, :16], mask[:, :16], ids[:, :16])  # the probe, before the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "sliced":
    loss, n = chunked_loss.token_loss_sum(model, ids, mask, ids)
else:
    loss, n = chunked_loss.next_token_loss_sum(model(input_ids=ids, attention_mask=mask).logits, ids)
loss.backward()
print(float(loss) / n, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux's")
def test_peak_memory_is_a_slice_of_logits_not_the_batchs():
    def run(mode: str) -> tuple[float, int]:
        out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
        loss, grown = out.stdout.split()[-2:]
        return float(loss), int(grown)

    (plain_loss, plain_mb), (sliced_loss, sliced_mb) = run("plain"), run("sliced")
    assert sliced_loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain_mb > 500  # 1020 x 64000 logits: 261 MB in fp32, and their softmax and gradient beside them
    assert sliced_mb < plain_mb / 5


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # a LoRA head of its own; a tied one (the embedding's factors)
def test_a_head_with_lora_on_it_is_sliced_too(family, monkeypatch):
    import dataclasses
    from offsite.emulator import methods
    from offsite.emulator.build import make_emulator
    from offsite.emulator.extras import extra_names
    from offsite.emulator.plan import SplitPlan
    plan = dataclasses.replace(SplitPlan.uniform(6, 2, 2, 1), extras=extra_names(tiny(family), ("head",)))
    model, _ = methods.attach(make_emulator(tiny(family), plan), plan, methods.MethodConfig("lora", r=2), on_emulator=True)
    for n, p in model.named_parameters():
        if "lora_B" in n or "lora_embedding_A" in n:  # B (A for embeddings) starts at zero: make the head's change show
            torch.nn.init.normal_(p, std=0.1)
    model.train()
    slices = []
    real = chunked_loss._slice_loss
    monkeypatch.setattr(chunked_loss, "_slice_loss", lambda *a: slices.append(a[1].shape[0]) or real(*a))
    monkeypatch.setattr(chunked_loss, "LOGIT_VALUES_PER_SLICE", 5 * V)
    want = _loss_and_grads(model, lambda: chunked_loss.next_token_loss_sum(model(input_ids=IDS, attention_mask=MASK).logits, LABELS))
    got = _loss_and_grads(model, lambda: chunked_loss.token_loss_sum(model, IDS, MASK, LABELS))
    assert slices and got[0] == pytest.approx(want[0], rel=1e-5)
    assert any("lora" in k for k in want[2]) and got[2].keys() == want[2].keys()
    for name, grad in want[2].items():  # gradients up to ~60 here: float32 sums differ by ~1e-5 either way
        torch.testing.assert_close(got[2][name], grad, rtol=1e-4, atol=1e-4, msg=name)
