"""The split works on every common decoder family, found structurally (no per-family table)."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from offsite.emulator.adapter import extract_adapter, load_adapter
from offsite.emulator.blocks import find_blocks
from offsite.emulator.build import make_emulator
from offsite.emulator.plan import SplitPlan

V, H, L = 96, 32, 6
COMMON = dict(vocab_size=V, bos_token_id=1, eos_token_id=2, pad_token_id=0)
FAMILIES = {
    "gpt2": dict(n_embd=H, n_layer=L, n_head=4, n_positions=64),
    "opt": dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, ffn_dim=64, max_position_embeddings=64, word_embed_proj_dim=H),
    "llama": dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    "mistral": dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    "qwen2": dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    "qwen3": dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, head_dim=8),
    "gemma2": dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, head_dim=8, sliding_window=16),
    "phi3": dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64),
    "gpt_neox": dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4, intermediate_size=64),
    "bloom": dict(hidden_size=H, n_layer=L, n_head=4),
    "falcon": dict(hidden_size=H, num_hidden_layers=L, num_attention_heads=4),
}


def tiny(family: str):
    config = AutoConfig.for_model(family, **COMMON, **FAMILIES[family])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


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
