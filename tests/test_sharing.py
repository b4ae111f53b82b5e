"""CRaSh's layer sharing: kept middle blocks run again for the dropped ones they stand for."""
import json

import pytest
import torch

from offsite.emulator.blocks import keep_blocks
from offsite.emulator.build import build, make_emulator
from offsite.emulator.bundle import load_bundle
from offsite.emulator.config import EmulatorConfig
from offsite.emulator.plan import SplitPlan
from offsite.emulator.strategy import similarity_plan
from offsite.errors import ConfigError
from tests.test_families import FAMILIES, IDS, L, tiny
from tests.test_strategy import _blocky


@pytest.mark.parametrize("n, bottom, top, kept, spans", [
    (8, 2, 2, (4,), (4,)),             # one block for the whole middle 2..5
    (8, 2, 2, (2, 5), (2, 2)),         # 2,3 -> 2 and 4,5 -> 5
    (10, 2, 2, (2, 4, 7), (2, 2, 2)),  # 3 is 1 from 2 and 4: the lower; 5 -> 4; 6, 7 -> 7
    (8, 1, 1, (1, 6), (3, 3)),         # 3 -> 1 (2 away), 4 -> 6 (2 away from 6, 3 from 1)
    (6, 2, 2, (2, 3), (1, 1)),         # nothing dropped: no sharing
])
def test_nearest_spans_give_every_middle_block_to_the_nearest_kept_one(n, bottom, top, kept, spans):
    plan = SplitPlan(n, bottom, top, kept)
    assert plan.nearest_spans() == spans
    shared = SplitPlan(n, bottom, top, kept, repeats=spans)
    assert SplitPlan.from_dict(shared.to_dict()) == shared


@pytest.mark.parametrize("repeats", [(1,), (2, 1), (3, 2), (0, 4), (4, 0)])
def test_repeats_must_cover_the_middle_once(repeats):
    with pytest.raises(ConfigError, match="repeats"):
        SplitPlan(8, 2, 2, (2, 5), repeats=repeats)


def test_similarity_plan_shares_each_representative_over_its_cluster():
    plan = similarity_plan(10, 2, 2, 2, _blocky([4, 2]), share=True)
    assert plan.repeats == (4, 2)
    assert similarity_plan(10, 2, 2, 2, _blocky([4, 2])).repeats == ()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_shared_emulator_is_the_model_with_its_kept_blocks_repeated(family):
    """Keep 1 of the 2 middle blocks, shared over both: the same as the model whose block list holds that
    block twice (same weights, full depth), and not the unshared emulator."""
    plan = SplitPlan(L, 2, 2, (3,), repeats=(2,))
    shared, repeated, unshared = tiny(family), tiny(family), tiny(family)
    make_emulator(shared, plan)
    keep_blocks(repeated, [0, 1, 3, 3, 4, 5])
    keep_blocks(unshared, plan.emulator_order)
    with torch.no_grad():
        logits = shared(IDS, use_cache=False).logits
        assert torch.allclose(logits, repeated(IDS, use_cache=False).logits, atol=1e-5)
        assert not torch.allclose(logits, unshared(IDS, use_cache=False).logits, atol=1e-3)
        hidden = shared(IDS, output_hidden_states=True).hidden_states
        assert len(hidden) == len(plan.emulator_order) + 1  # one per block of the list, the shared one's last run
    out = shared.generate(IDS[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)  # without a cache
    assert out.shape == (1, 14)


def test_bundle_with_shared_blocks_reloads_shared(tiny_model, tmp_path):
    result = build(str(tiny_model), EmulatorConfig(emulator_layers=1, share_blocks=True), tmp_path / "b", show_progress=False)
    manifest = json.loads((tmp_path / "b" / "offsite-manifest.json").read_text())
    middle = result.plan.num_blocks - result.plan.bottom - result.plan.top
    assert manifest["plan"]["repeats"] == [middle] and manifest["provenance"]["shared"] is True
    shared, _, plan = load_bundle(tmp_path / "b")
    plain = load_bundle(build(str(tiny_model), EmulatorConfig(emulator_layers=1), tmp_path / "p", show_progress=False).bundle_dir)[0]
    ids = torch.randint(5, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(shared(ids).logits, plain(ids).logits, atol=1e-3)
    assert plan.repeats == (middle,) and result.emulator_params == sum(p.numel() for p in plain.parameters())


def test_job_file_turns_sharing_on(tmp_path):
    from offsite.cloud.job import JobConfig

    (tmp_path / "job.toml").write_text('[job]\nid = "j"\nbase_model = "m"\n[split]\nshare_blocks = true\n')
    assert JobConfig.from_toml(tmp_path / "job.toml").emulator_config().share_blocks
