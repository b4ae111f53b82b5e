"""FedAvg: weighted by training examples, exact, dtype-preserving."""
import pytest
import torch

from offsite.cloud.aggregate import FedAvg, fedavg
from offsite.errors import InvalidUpdateError


def test_weighted_mean_by_examples():
    like = {"w": torch.zeros(2), "b": torch.zeros(1)}
    updates = [({"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])}, 1.0),
               ({"w": torch.tensor([4.0, 8.0]), "b": torch.tensor([3.0])}, 2.0)]
    out = fedavg(updates, like)
    assert torch.allclose(out["w"], torch.tensor([3.0, 6.0]))
    assert torch.allclose(out["b"], torch.tensor([2.0]))


def test_equal_weights_is_plain_mean_and_dtype_kept():
    like = {"w": torch.zeros(3, dtype=torch.bfloat16)}
    ups = [({"w": torch.full((3,), float(i))}, 5.0) for i in range(4)]
    out = fedavg(ups, like)
    assert out["w"].dtype == torch.bfloat16 and torch.allclose(out["w"].float(), torch.full((3,), 1.5))


def test_empty_and_nonpositive_weights_refused():
    with pytest.raises(InvalidUpdateError):
        FedAvg().result({})
    with pytest.raises(InvalidUpdateError):
        FedAvg().add({"w": torch.ones(1)}, 0.0)
