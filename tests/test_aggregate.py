"""Aggregation: the weighted mean by examples, and each strategy's update rule checked against hand computations."""
import pytest
import torch

from offsite.cloud.aggregate import FedAdam, FedAvg, FedAvgM, WeightedMean, fedavg, make_strategy
from offsite.errors import ConfigError, InvalidUpdateError
from offsite.tensors import from_bytes, to_bytes


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_weighted_mean_by_examples():
    mean = WeightedMean()
    mean.add({"w": t(1.0, 2.0), "b": t(0.0)}, 1.0)
    mean.add({"w": t(4.0, 8.0), "b": t(3.0)}, 2.0)
    out = mean.result()
    assert mean.count == 2
    assert out["w"].dtype == torch.float64
    assert out["w"].tolist() == [3.0, 6.0] and out["b"].tolist() == [2.0]


def test_a_float32_sum_holds_half_the_memory_and_stays_far_finer_than_a_bf16_cast():
    torch.manual_seed(0)
    updates = [torch.randn(1000).to(torch.bfloat16) for _ in range(200)]
    wide, narrow = WeightedMean(), WeightedMean(torch.float32)
    for i, u in enumerate(updates):
        wide.add({"w": u}, 1.0 + i % 7)
        narrow.add({"w": u}, 1.0 + i % 7)
    exact, approx = wide.result()["w"], narrow.result()["w"]
    assert approx.dtype == torch.float32 and approx.element_size() * 2 == exact.element_size()
    cast_error = (exact.to(torch.bfloat16).double() - exact).abs().max()
    assert (approx.double() - exact).abs().max() < cast_error / 1000
    assert torch.equal(approx.to(torch.bfloat16), exact.to(torch.bfloat16))


def test_fedavg_helper_equal_weights_is_plain_mean_and_dtype_kept():
    like = {"w": torch.zeros(3, dtype=torch.bfloat16)}
    out = fedavg([({"w": torch.full((3,), float(i))}, 5.0) for i in range(4)], like)
    assert out["w"].dtype == torch.bfloat16 and out["w"].float().tolist() == [1.5, 1.5, 1.5]


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan"), float("inf")])
def test_nonpositive_or_nonfinite_weight_refused(weight):
    with pytest.raises(InvalidUpdateError, match="weight"):
        WeightedMean().add({"w": torch.ones(1)}, weight)


@pytest.mark.parametrize("second", [{"w": torch.ones(1)}, {"w": torch.ones(2), "x": torch.ones(1)}, {"v": torch.ones(2)}])
def test_update_unlike_the_first_refused(second):
    mean = WeightedMean()
    mean.add({"w": torch.ones(2)}, 1.0)
    with pytest.raises(InvalidUpdateError, match="names or shapes"):
        mean.add(second, 1.0)


def test_empty_mean_refused():
    with pytest.raises(InvalidUpdateError, match="no updates"):
        WeightedMean().result()


def test_fedavg_step_is_the_mean_in_the_global_dtypes():
    global_ = {"w": torch.zeros(2, dtype=torch.bfloat16), "b": torch.zeros(1)}
    mean = {"w": torch.tensor([0.25, -3.0], dtype=torch.float64), "b": torch.tensor([1.5], dtype=torch.float64)}
    new, state = FedAvg().step(global_, mean, {})
    assert new["w"].dtype == torch.bfloat16 and new["b"].dtype == torch.float32
    assert new["w"].float().tolist() == [0.25, -3.0] and new["b"].tolist() == [1.5]
    assert state == {}


def test_fedavgm_three_rounds_by_hand():
    # server_lr 0.5, momentum 0.5:  v = 0.5 v + (mean - g);  g = g + 0.5 v
    # round 1: delta [2, -2]  v [2, -2]             g [0, 4] -> [1, 3]
    # round 2: delta [2, 0]   v [1+2, -1+0] = [3, -1]  g -> [2.5, 2.5]
    # round 3: delta [0, 0]   v [1.5, -0.5]          g -> [3.25, 2.25]  (momentum keeps moving it)
    rounds = [(t(2.0, 2.0), [1.0, 3.0], [2.0, -2.0]),
              (t(3.0, 3.0), [2.5, 2.5], [3.0, -1.0]),
              (t(2.5, 2.5), [3.25, 2.25], [1.5, -0.5])]
    strategy, g, state = FedAvgM(server_lr=0.5, momentum=0.5), {"w": t(0.0, 4.0)}, {}
    for mean, want_global, want_momentum in rounds:
        g, state = strategy.step(g, {"w": mean.double()}, state)
        assert g["w"].tolist() == want_global
        assert state["momentum/w"].tolist() == want_momentum


def test_fedadam_two_rounds_by_hand():
    # server_lr 0.5, beta1 0.5, beta2 0.75, tau 2:  g = g + 0.5 m / (sqrt(v) + 2)
    # round 1: delta [4, -12]  m [2, -6]  v [4, 36]   g [0, 1] -> [0 + 0.5*2/4, 1 - 0.5*6/8] = [0.25, 0.625]
    # round 2: delta [2, 6]    m [1+1, -3+3] = [2, 0]  v [3+1, 27+9] = [4, 36]  g -> [0.5, 0.625]
    rounds = [(t(4.0, -11.0), [0.25, 0.625], [2.0, -6.0], [4.0, 36.0]),
              (t(2.25, 6.625), [0.5, 0.625], [2.0, 0.0], [4.0, 36.0])]
    strategy, g, state = FedAdam(server_lr=0.5, beta1=0.5, beta2=0.75, tau=2.0), {"w": t(0.0, 1.0)}, {}
    for mean, want_global, want_m, want_v in rounds:
        g, state = strategy.step(g, {"w": mean.double()}, state)
        assert g["w"].tolist() == want_global
        assert state["m/w"].tolist() == want_m and state["v/w"].tolist() == want_v


def test_fedavgm_without_momentum_at_unit_lr_is_fedavg():
    torch.manual_seed(0)
    global_ = {"w": torch.randn(64, 8), "b": torch.randn(8).bfloat16()}
    mean = {k: torch.randn(v.shape, dtype=torch.float64) for k, v in global_.items()}
    plain, _ = FedAvg().step(global_, mean, {})
    still, _ = FedAvgM(server_lr=1.0, momentum=0.0).step(global_, mean, {})
    for k in global_:
        assert still[k].dtype == plain[k].dtype
        torch.testing.assert_close(still[k], plain[k])


@pytest.mark.parametrize("strategy", [FedAvg(), FedAvgM(), FedAdam(server_lr=0.1)])
def test_state_round_trips_through_safetensors_bytes(strategy):
    torch.manual_seed(1)
    g0 = {"w": torch.randn(4, 3), "b": torch.randn(3).bfloat16()}
    means = [{k: torch.randn(v.shape, dtype=torch.float64) for k, v in g0.items()} for _ in range(2)]
    g_mem, state = strategy.step(g0, means[0], {})
    assert all(v.dtype == torch.float32 for v in state.values())
    g_disk, stored = g_mem, from_bytes(to_bytes(state))
    g_mem, _ = strategy.step(g_mem, means[1], state)
    g_disk, _ = strategy.step(g_disk, means[1], stored)
    for k in g0:
        assert g_disk[k].dtype == g0[k].dtype and torch.equal(g_disk[k], g_mem[k])


@pytest.mark.parametrize("name, params, field", [
    ("fedavgm", {"server_lr": 0.0}, "server_lr"),
    ("fedavgm", {"server_lr": float("inf")}, "server_lr"),
    ("fedavgm", {"momentum": 1.0}, "momentum"),
    ("fedavgm", {"momentum": -0.1}, "momentum"),
    ("fedadam", {"server_lr": -1e-2}, "server_lr"),
    ("fedadam", {"beta1": 1.0}, "beta1"),
    ("fedadam", {"beta2": float("nan")}, "beta2"),
    ("fedadam", {"tau": 0.0}, "tau"),
    ("fedavg", {"momentum": 0.9}, "momentum"),   # FedAvg takes no parameters
    ("fedadam", {"beta": 0.9}, "beta"),          # a misspelt name
])
def test_bad_parameters_are_config_errors(name, params, field):
    with pytest.raises(ConfigError, match=field):
        make_strategy(name, **params)


def test_make_strategy_by_name():
    assert make_strategy("fedadam", server_lr=0.1) == FedAdam(server_lr=0.1)
    assert make_strategy("fedavgm") == FedAvgM(server_lr=1.0, momentum=0.9)
    with pytest.raises(ConfigError, match="known: fedavg, fedavgm, fedadam"):
        make_strategy("fedprox")
