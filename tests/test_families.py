"""The split works on every common decoder family, found structurally (no per-family table)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from offsite.emulator.adapter import extract_adapter, load_adapter
from offsite.emulator.blocks import find_blocks
from offsite.emulator.build import make_emulator
from offsite.emulator.plan import SplitPlan
from offsite.emulator.support import FAMILIES, L, V, tiny  # noqa: F401 (V, tiny: imported from here by other tests)

IDS = torch.randint(3, V, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def test_emulator_forward_and_generate_with_cache(family):
    model = tiny(family)
    make_emulator(model, SplitPlan.uniform(L, 2, 2, 1))
    assert len(find_blocks(model).blocks) == 5 and model.config.num_hidden_layers == 5
    with torch.no_grad():
        assert model(IDS).logits.shape == (2, 10, V)
    out = model.generate(IDS[:1], max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    assert out.shape == (1, 14)


def test_emulator_dropping_nothing_is_the_model(family):
    model, emulator = tiny(family), tiny(family)
    make_emulator(emulator, SplitPlan.uniform(L, 2, 2, 2))
    with torch.no_grad():
        assert torch.equal(emulator(IDS).logits, model(IDS).logits)


def test_untouched_adapter_plugs_back_exactly(family, tmp_path):
    plan = SplitPlan.uniform(L, 2, 2, 1)
    model, emulator = tiny(family), tiny(family)
    with torch.no_grad():
        reference = model(IDS).logits
    make_emulator(emulator, plan)
    emulator.save_pretrained(str(tmp_path), safe_serialization=True)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, emulator(IDS).logits)
    adapter = extract_adapter(reloaded, plan, on_emulator=True)
    target = tiny(family)
    with torch.no_grad():
        for p in find_blocks(target).blocks[0].parameters():
            p.add_(1.0)  # disturb an adapter block, then plug the adapter back in
    load_adapter(target, plan, adapter, on_emulator=False)
    with torch.no_grad():
        assert torch.equal(target(IDS).logits, reference)
