"""Similarity-based block selection (CRaSh-style) and low-rank attention (ScaleOT-style)."""
import json

import pytest
import torch

from offsite.emulator.blocks import find_blocks
from offsite.emulator.build import build, make_emulator
from offsite.emulator.config import EmulatorConfig
from offsite.emulator.plan import SplitPlan
from offsite.emulator.strategy import contiguous_clusters, linear_cka, low_rank_attention, similarity_plan
from offsite.errors import ConfigError
from tests.test_families import FAMILIES, L, tiny


def test_linear_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-5)
    assert linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0, abs=1e-4)  # scale, rotation, shift
    assert linear_cka(x, torch.randn(500, 16, generator=g)) < 0.1


def _blocky(sizes):
    """A similarity matrix with high similarity inside each run of `sizes` and low across."""
    m = sum(sizes)
    sim = torch.full((m, m), 0.2)
    start = 0
    for s in sizes:
        sim[start:start + s, start:start + s] = 0.9
        start += s
    sim.fill_diagonal_(1.0)
    return sim


@pytest.mark.parametrize("sizes", [[3, 1], [1, 3], [2, 2], [2, 3, 1], [1, 1, 1, 1]])
def test_contiguous_clusters_recover_the_runs(sizes):
    runs = contiguous_clusters(_blocky(sizes), len(sizes))
    assert [len(r) for r in runs] == sizes
    assert [i for r in runs for i in r] == list(range(sum(sizes)))


def test_similarity_plan_keeps_one_block_per_cluster():
    plan = similarity_plan(10, 2, 2, 2, _blocky([4, 2]))
    assert len(plan.kept_middle) == 2 and 2 <= plan.kept_middle[0] <= 5 and plan.kept_middle[1] in (6, 7)
    with pytest.raises(ConfigError):
        contiguous_clusters(_blocky([2, 2]), 5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_low_rank_attention_changes_only_kept_attention(family):
    model = tiny(family)
    plan = SplitPlan.uniform(L, 2, 2, 1)
    make_emulator(model, plan)
    blocks = find_blocks(model).blocks
    before = {k: v.clone() for k, v in model.state_dict().items()}
    changed = low_rank_attention(model, plan, rank=2)
    assert changed >= 2
    after = model.state_dict()
    middle = f"{find_blocks(model).path}.2."
    for name, value in after.items():
        if not name.startswith(middle):
            assert torch.equal(value, before[name]), name
    attention_weights = [p for n, p in blocks[2].named_parameters() if p.dim() == 2 and ("attn" in n or "attention" in n)]
    assert attention_weights and all(torch.linalg.matrix_rank(p.float()) <= 2 for p in attention_weights)


def test_build_with_similarity_and_rank_records_provenance(tiny_model, client_data, tmp_path):
    cfg = EmulatorConfig(emulator_layers=1, strategy="similarity", attn_rank=4,
                         calibration_data=str(client_data[0] / "train.jsonl"))
    result = build(str(tiny_model), cfg, tmp_path / "bundle", show_progress=False)
    manifest = json.loads((tmp_path / "bundle" / "offsite-manifest.json").read_text())
    prov = manifest["provenance"]
    assert prov["strategy"] == "similarity" and prov["attn_rank"] == 4
    assert len(prov["similarity"]) == 2 and prov["similarity"][0][0] == 1.0
    assert manifest["plan"]["kept_middle"] == list(result.plan.kept_middle) and len(result.plan.kept_middle) == 1


def test_similarity_needs_calibration_text():
    with pytest.raises(ConfigError, match="calibration"):
        EmulatorConfig(strategy="similarity")
    with pytest.raises(ConfigError, match="strategy"):
        EmulatorConfig(strategy="random")
