"""Tensor checks an update must pass before it counts."""
import pytest
import torch

from offsite.errors import InvalidUpdateError
from offsite.tensors import check_matches, from_bytes, spec_digest, spec_of, to_bytes

GOOD = {"a": torch.zeros(2, 3), "b": torch.ones(4)}
SPEC = spec_of(GOOD)


def test_round_trip_through_safetensors_bytes():
    back = from_bytes(to_bytes(GOOD))
    assert spec_of(back) == SPEC and all(torch.equal(back[k], GOOD[k]) for k in GOOD)


@pytest.mark.parametrize("bad, message", [
    ({"a": torch.zeros(2, 3)}, "missing"),
    ({**GOOD, "c": torch.zeros(1)}, "extra"),
    ({"a": torch.zeros(3, 2), "b": torch.ones(4)}, "shape"),
    ({"a": torch.zeros(2, 3, dtype=torch.float16), "b": torch.ones(4)}, "dtype"),
    ({"a": torch.full((2, 3), float("nan")), "b": torch.ones(4)}, "non-finite"),
    ({"a": torch.zeros(2, 3), "b": torch.tensor([1.0, float("inf"), 0, 0])}, "non-finite"),
])
def test_mismatches_are_named(bad, message):
    with pytest.raises(InvalidUpdateError, match=message):
        check_matches(bad, SPEC)


def test_garbage_bytes_are_not_a_payload():
    with pytest.raises(InvalidUpdateError, match="safetensors"):
        from_bytes(b"\x00" * 64)


def test_spec_digest_changes_with_shape():
    assert spec_digest(SPEC) != spec_digest(spec_of({"a": torch.zeros(2, 4), "b": torch.ones(4)}))
