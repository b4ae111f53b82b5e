"""Byzantine-robust combiners and the weight cap, checked against hand computations on tiny safetensors files."""
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from offsite.cloud.aggregate import cap_weights
from offsite.cloud.robust import (COMBINERS, Krum, Median, MultiKrum, TrimmedMean, _blocks, _check, make_combiner,
                                  mean)
from offsite.errors import ConfigError, InvalidUpdateError

FACTORS = torch.tensor([[1.0, -1.0], [10.0, 0.5], [0.0, 3.0]])


def save(tmp_path: Path, proposals: list[dict[str, torch.Tensor]]) -> list[Path]:
    paths = []
    for i, tensors in enumerate(proposals):
        paths.append(tmp_path / f"p{i}.safetensors")
        save_file(tensors, str(paths[-1]))
    return paths


def scalar_proposal(v: float) -> dict[str, torch.Tensor]:
    """A 0-d, a 1-d and a 2-d tensor, every coordinate a fixed multiple of v (some negative, so per-coordinate
    order flips): a coordinate-wise rule applied to values v_i gives the rule's value m times the multiples."""
    return {"s": torch.tensor(float(v)), "b": torch.tensor([v, -v], dtype=torch.float32), "w": v * FACTORS}


def assert_scalar_result(out: dict[str, torch.Tensor], m: float) -> None:
    assert {k: (v.dtype, tuple(v.shape)) for k, v in out.items()} == {
        "s": (torch.float64, ()), "b": (torch.float64, (2,)), "w": (torch.float64, (3, 2))}
    torch.testing.assert_close(out["s"], torch.tensor(m, dtype=torch.float64), rtol=1e-15, atol=0)
    torch.testing.assert_close(out["b"], torch.tensor([m, -m], dtype=torch.float64), rtol=1e-15, atol=0)
    torch.testing.assert_close(out["w"], m * FACTORS.double(), rtol=1e-15, atol=0)


@pytest.mark.parametrize("values, expected", [
    ([7], 7.0),
    ([1, 5, 2], 2.0),            # sorted 1 2 5
    ([1, 5, 2, 10], 3.5),        # sorted 1 2 5 10: (2 + 5) / 2, not torch.median's lower 2
    ([4, -3, 4, 0, 9], 4.0),     # sorted -3 0 4 4 9
])
def test_median(tmp_path, values, expected):
    assert_scalar_result(Median().combine(save(tmp_path, [scalar_proposal(v) for v in values])), expected)


@pytest.mark.parametrize("trim, values, expected", [
    (0.25, [1, 5, 2, 10], 3.5),         # k = floor(1.0) = 1: drop 1 and 10, mean(2, 5)
    (0.25, [1, 5, 2, 10, 4], 11 / 3),   # k = floor(1.25) = 1: sorted 1 2 4 5 10 -> mean(2, 4, 5)
    (0.25, [1, 5, 2], 8 / 3),           # k = floor(0.75) = 0: the plain mean
    (0.0, [1, 5, 2, 10], 4.5),          # trim 0: the plain mean 18 / 4
    (0.4, [1, 5, 2, 10, 4], 4.0),       # k = floor(2.0) = 2: the middle value
])
def test_trimmed_mean(tmp_path, trim, values, expected):
    assert_scalar_result(TrimmedMean(trim).combine(save(tmp_path, [scalar_proposal(v) for v in values])), expected)


def test_trimmed_mean_k_is_the_floor_of_the_decimal(tmp_path):
    # 0.29 * 100 is 28.999999999999996 in binary; the paper's k = floor(0.29 * 100) = 29.
    # Values 0..70, then 29 attackers at 1000: k = 29 drops all of them and 0..28, leaving 29..70, mean 49.5;
    # k = 28 would keep one 1000.
    values = list(range(71)) + [1000] * 29
    out = TrimmedMean(0.29).combine(save(tmp_path, [{"s": torch.tensor(float(v))} for v in values]))
    assert TrimmedMean(0.29).trimmed(100) == 29 and out["s"].item() == 49.5


def krum_points(tmp_path: Path) -> list[Path]:
    # 2-d points (x in tensor "a", y in tensor "b"): P0 (0, 0), P1 (1, 0), P2 (0, 2), P3 (2, 2), attacker P4 (100, 100).
    points = [(0, 0), (1, 0), (0, 2), (2, 2), (100, 100)]
    return save(tmp_path, [{"a": torch.tensor([float(x)]), "b": torch.tensor([[float(y), 0.0], [0.0, 0.0]])}
                           for x, y in points])


# Squared distances: P0-P1 1, P0-P2 4, P0-P3 8, P1-P2 5, P1-P3 5, P2-P3 4,
# P4-P0 100^2 + 100^2 = 20000, P4-P1 99^2 + 100^2 = 19801, P4-P2 100^2 + 98^2 = 19604, P4-P3 98^2 + 98^2 = 19208.
# n = 5, f = 1: each score sums the n - f - 2 = 2 smallest: P0 1 + 4, P1 1 + 5, P2 4 + 4, P3 5 + 4, P4 19208 + 19604.
KRUM_SCORES = [5.0, 6.0, 8.0, 9.0, 38812.0]


@pytest.mark.parametrize("combiner, selected, a, y", [
    (Krum(1), [0], 0.0, 0.0),                          # P0 itself
    (MultiKrum(1, keep=2), [0, 1], 0.5, 0.0),          # mean of P0, P1
    (MultiKrum(1), [0, 1, 2, 3], 0.75, 1.0),           # keep 0 = n - f = 4: mean of the honest four
])
def test_krum_and_multi_krum_by_hand(tmp_path, combiner, selected, a, y):
    paths = krum_points(tmp_path)
    selection = combiner.select(paths)
    assert selection.scores == pytest.approx(KRUM_SCORES, rel=1e-12)
    assert selection.selected == selected
    out = combiner.combine(paths)
    assert out["a"].dtype == torch.float64 and out["a"].tolist() == [a]
    assert out["b"].tolist() == [[y, 0.0], [0.0, 0.0]]


def test_krum_tie_goes_to_the_lowest_index(tmp_path):
    # 1-d points 5 0 0 0 5, f = 1, 2 closest: scores 0 + 25 = 25, 0, 0, 0, 25.
    paths = save(tmp_path, [{"a": torch.tensor([float(v)])} for v in (5, 0, 0, 0, 5)])
    assert Krum(1).select(paths).scores == [25.0, 0.0, 0.0, 0.0, 25.0]
    assert Krum(1).select(paths).selected == [1]
    assert MultiKrum(1, keep=2).select(paths).selected == [1, 2]


@pytest.mark.parametrize("combiner, n", [(Krum(1), 4), (Krum(0), 2), (Krum(2), 6), (MultiKrum(1), 4),
                                         (MultiKrum(0, keep=4), 3)])
def test_krum_needs_more_than_2f_plus_2(tmp_path, combiner, n):
    paths = save(tmp_path, [{"a": torch.tensor([float(i)])} for i in range(n)])
    with pytest.raises(InvalidUpdateError, match=rf"byzantine={combiner.byzantine}.* got n={n}$"):
        combiner.combine(paths)


def test_min_updates():
    assert [c.min_updates() for c in (Median(), TrimmedMean(0.4), Krum(0), Krum(2), MultiKrum(1), MultiKrum(1, keep=9))] \
        == [1, 1, 3, 7, 5, 9]


ALL = [Median(), TrimmedMean(0.2), Krum(1), MultiKrum(1, keep=2), MultiKrum(1)]


def random_proposals(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(37, 5, generator=g).to(dtype), "v": torch.randn(7, generator=g).to(dtype),
             "s": torch.randn((), generator=g).to(dtype), "e": torch.zeros(0, 3, dtype=dtype)} for _ in range(n)]


@pytest.mark.parametrize("combiner", ALL, ids=repr)
def test_block_budget_does_not_change_results(tmp_path, combiner):
    paths = save(tmp_path, random_proposals(5))
    whole = combiner.combine(paths, budget=2**30)
    for budget in (1, 7, 60):  # 37 blocks of one row, 37 again (7 // 25 = 0 -> 1 row), 19 blocks of 2 rows
        out = combiner.combine(paths, budget=budget)
        assert all(torch.equal(out[k], whole[k]) for k in whole) and out.keys() == whole.keys()


def test_coordinatewise_rules_agree_with_numpy(tmp_path):
    proposals = random_proposals(6, seed=1)
    paths = save(tmp_path, proposals)
    x = np.stack([p["w"].double().numpy() for p in proposals])
    np.testing.assert_allclose(Median().combine(paths, budget=7)["w"].numpy(), np.median(x, axis=0), rtol=1e-15)
    # trim 0.2 of 6: k = 1
    np.testing.assert_allclose(TrimmedMean(0.2).combine(paths, budget=7)["w"].numpy(),
                               np.sort(x, axis=0)[1:5].mean(axis=0), rtol=1e-14)


def test_blocks_stay_within_the_budget(tmp_path):
    paths = save(tmp_path, random_proposals(5))
    shapes = _check(paths, 1, "test", 60)
    blocks = [(name, tuple(block.shape)) for name, _, block in _blocks(paths, shapes, 60)]
    # 60 // (5 proposals * 5 values a row) = 2 rows: 18 blocks of 2 rows and one of 1; 0-d and 1-d whole;
    # the (0, 3) tensor has no rows to read.
    assert [s for name, s in blocks if name == "w"] == [(5, 2, 5)] * 18 + [(5, 1, 5)]
    assert [s for name, s in blocks if name != "w"] == [(5,), (5, 7)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("combiner", ALL, ids=repr)
def test_half_precision_inputs_give_the_upcast_result(tmp_path, combiner, dtype):
    half = random_proposals(5, seed=2, dtype=dtype)
    upcast = [{k: v.float() for k, v in p.items()} for p in half]  # exactly the same values in float32
    (tmp_path / "half").mkdir(), (tmp_path / "f32").mkdir()
    out = combiner.combine(save(tmp_path / "half", half), budget=7)
    expected = combiner.combine(save(tmp_path / "f32", upcast), budget=7)
    assert all(out[k].dtype == torch.float64 and torch.equal(out[k], expected[k]) for k in expected)


@pytest.mark.parametrize("second", [
    {"w": torch.ones(2, 3), "b": torch.ones(2), "x": torch.ones(1)},   # an extra name
    {"w": torch.ones(2, 3)},                                           # a missing name
    {"w": torch.ones(3, 2), "b": torch.ones(2)},                       # a different shape
])
@pytest.mark.parametrize("combiner", ALL, ids=repr)
def test_proposal_unlike_the_first_refused(tmp_path, combiner, second):
    first = {"w": torch.ones(2, 3), "b": torch.ones(2)}
    paths = save(tmp_path, [first, second] + [first] * 3)
    with pytest.raises(InvalidUpdateError, match="proposal 1 .* names or shapes"):
        combiner.combine(paths)


@pytest.mark.parametrize("name, params, match", [
    ("trimmed_mean", {"trim": 0.5}, "trim must be in"),
    ("trimmed_mean", {"trim": -0.1}, "trim must be in"),
    ("trimmed_mean", {"trim": float("nan")}, "trim must be in"),
    ("trimmed_mean", {"trim": "0.1"}, "bad parameters"),
    ("krum", {"byzantine": -1}, "byzantine must be"),
    ("krum", {"byzantine": 1.5}, "byzantine must be"),
    ("krum", {"byzantine": True}, "byzantine must be"),
    ("multi_krum", {"keep": -1}, "keep must be"),
    ("multi_krum", {"byzantine": -1, "keep": 2}, "byzantine must be"),
    ("median", {"trim": 0.1}, "bad parameters for combiner 'median'"),
    ("krum", {"keep": 2}, "bad parameters for combiner 'krum'"),
    ("mean", {}, "unknown combiner 'mean'; known: median, trimmed_mean, krum, multi_krum"),
])
def test_bad_configuration_refused(name, params, match):
    with pytest.raises(ConfigError, match=match):
        make_combiner(name, **params)


def test_make_combiner_and_registry():
    assert list(COMBINERS) == ["median", "trimmed_mean", "krum", "multi_krum"]
    assert make_combiner("trimmed_mean", trim=0.25) == TrimmedMean(0.25)
    assert make_combiner("multi_krum", byzantine=2, keep=3) == MultiKrum(2, 3)
    assert make_combiner("median") == Median() and make_combiner("krum") == Krum(1)


def test_bad_budget_refused(tmp_path):
    with pytest.raises(ConfigError, match="budget"):
        Median().combine(save(tmp_path, [scalar_proposal(1.0)]), budget=0)


def test_mean_of_files(tmp_path):
    out = mean(save(tmp_path, [scalar_proposal(v) for v in (1, 5, 2, 10)]), budget=1)
    assert_scalar_result(out, 4.5)  # 18 / 4


def attack_round(tmp_path: Path, attack: str) -> tuple[list[Path], dict[str, torch.Tensor]]:
    """6 honest proposals base + delta + noise, noise uniform in [-0.01, 0.01) per coordinate, and one attacker
    (index 3); returns the paths and the honest mean."""
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(8, 4, generator=g, dtype=torch.float64), "b": torch.randn(4, generator=g, dtype=torch.float64)}
    delta = {k: torch.full_like(v, 0.5) for k, v in base.items()}
    honest = [{k: base[k] + delta[k] + 0.02 * (torch.rand(v.shape, generator=g, dtype=torch.float64) - 0.5)
               for k, v in base.items()} for _ in range(6)]
    attacker = {k: base[k] + 1000.0 for k in base} if attack == "scaled" else {k: base[k] - 10 * delta[k] for k in base}
    proposals = honest[:3] + [attacker] + honest[3:]
    honest_mean = {k: torch.stack([h[k] for h in honest]).mean(dim=0) for k in base}
    return save(tmp_path, [{k: v.float() for k, v in p.items()} for p in proposals]), honest_mean


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in b)


@pytest.mark.parametrize("attack, plain_error", [
    ("scaled", 999.5 / 7),        # plain mean - honest mean = (attacker - honest mean) / 7 = (1000 - delta - noise) / 7
    ("sign_flip", 11 * 0.5 / 7),  # (-10 delta - delta - noise) / 7
])
def test_one_attacker_moves_the_mean_but_not_the_robust_rules(tmp_path, attack, plain_error):
    paths, honest_mean = attack_round(tmp_path, attack)
    # The plain mean, computed here directly: 142.8 (or 0.79) away per coordinate, give or take noise / 7 and float32.
    plain = {k: torch.stack([load_file(str(p))[k].double() for p in paths]).mean(dim=0) for k in honest_mean}
    assert abs(max_abs_diff(plain, honest_mean) - plain_error) < 0.01
    # Each robust result lies per coordinate within the honest proposals' range, base + delta +- 0.01, so within
    # 0.02 of the honest mean (plus float32 storage rounding).
    for combiner in (Median(), TrimmedMean(0.2), Krum(1), MultiKrum(1, keep=2), MultiKrum(1)):
        assert max_abs_diff(combiner.combine(paths), honest_mean) < 0.02, combiner
    assert 3 not in MultiKrum(1).select(paths).selected  # keep n - f = 6: exactly the honest ones
    assert max_abs_diff(MultiKrum(1).combine(paths), honest_mean) < 1e-6  # their mean (float32 storage)


@pytest.mark.parametrize("weights, max_share, expected", [
    ([1000, 1000, 2**40], 0.5, [1000, 1000, 2000]),  # k = 1: T = 0.5 * 2000 / (1 - 0.5) = 2000 >= 1000; shares .25 .25 .5
    ([1, 1, 1], 0.5, [1, 1, 1]),                     # k = 0: T = 0.5 * 3 = 1.5 >= 1: nothing capped
    ([10, 20], 0.5, [10, 10]),                       # n * max_share = 1: equal, at the smallest weight
    ([5, 5, 5, 5], 0.25, [5, 5, 5, 5]),              # n * max_share = 1
    ([10, 20, 30], 0.2, [10, 10, 10]),               # n * max_share < 1: equal
    ([1, 2, 3, 10], 0.4, [1, 2, 3, 4]),              # k = 1: T = 0.4 * (1 + 2 + 3 + T) -> T = 4; share 4 / 10
    ([10, 1, 3, 2], 0.4, [4, 1, 3, 2]),              # the same, order kept
    ([1, 1, 10, 10], 0.3, [1, 1, 1.5, 1.5]),         # k = 0: 6.6 < 10; k = 1: 0.3 * 12 / 0.7 = 5.14 < 10;
                                                     # k = 2: 0.3 * 2 / 0.4 = 1.5 >= 1; share 1.5 / 5 = 0.3
    ([3, 1, 2], 1.0, [3, 1, 2]),                     # max_share >= 1: unchanged
    ([3, 1, 2], 2.0, [3, 1, 2]),
    ([7], 0.3, [7]),                                 # one weight
    ([7], 1.0, [7]),
])
def test_cap_weights_by_hand(weights, max_share, expected):
    out = cap_weights(weights, max_share)
    assert out == pytest.approx(expected, rel=1e-15) and all(isinstance(w, float) for w in out)


def test_cap_weights_is_the_least_capping_that_meets_the_cap():
    rng = random.Random(0)
    for _ in range(200):
        weights = [rng.choice([1, 10, 100, 1000]) * rng.random() + 1e-3 for _ in range(rng.randint(2, 12))]
        share = rng.uniform(1.01 / len(weights), 0.99)
        out = cap_weights(weights, share)
        assert max(out) <= share * sum(out) * (1 + 1e-12)
        capped = [w for w, o in zip(weights, out) if o < w]
        if capped:  # the least capping: the cap is met with equality, and every capped weight sits at the cap T
            assert max(out) == pytest.approx(share * sum(out), rel=1e-12)
            assert len({o for w, o in zip(weights, out) if o < w}) == 1 and min(capped) >= max(out)
        else:
            assert out == weights


@pytest.mark.parametrize("weights", [[1, 0], [1, -2], [1, math.nan], [1, math.inf], []])
def test_cap_weights_refuses_bad_weights(weights):
    with pytest.raises(InvalidUpdateError, match="weight"):
        cap_weights(weights, 0.5)


@pytest.mark.parametrize("max_share", [0.0, -0.1, math.nan, math.inf])
def test_cap_weights_refuses_bad_max_share(max_share):
    with pytest.raises(ConfigError, match="max_share"):
        cap_weights([1, 2], max_share)
