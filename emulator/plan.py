"""The split plan: which original blocks form the adapter and which middle blocks the emulator keeps."""
from __future__ import annotations

from dataclasses import dataclass

from offsite.errors import ConfigError


@dataclass(frozen=True)
class SplitPlan:
    """Bottom `bottom` and top `top` blocks are the adapter; `kept_middle` (original indices, in order)
    are the emulator's compressed middle. `extras` are parameters outside the blocks that the adapter
    trains too (the final norm, the LM head, the input embeddings: see offsite.emulator.extras), by their
    names in the full model, which the emulator shares. `repeats` (CRaSh's layer sharing), when set, says
    how many times each kept middle block runs, so that it stands in for the span of dropped blocks around
    it and the emulator keeps the full model's depth; they sum to the middle's length."""

    num_blocks: int
    bottom: int
    top: int
    kept_middle: tuple[int, ...]
    extras: tuple[str, ...] = ()
    repeats: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.bottom < 1 or self.top < 1:
            raise ConfigError(f"adapter needs at least one bottom and one top block, got {self.bottom}/{self.top}")
        if self.bottom + self.top >= self.num_blocks:
            raise ConfigError(
                f"bottom {self.bottom} + top {self.top} leaves no middle in a {self.num_blocks}-block model"
            )
        middle = range(self.bottom, self.num_blocks - self.top)
        if not self.kept_middle:
            raise ConfigError("the emulator must keep at least one middle block")
        if any(i not in middle for i in self.kept_middle) or list(self.kept_middle) != sorted(set(self.kept_middle)):
            raise ConfigError(f"kept_middle {self.kept_middle} must be increasing indices in {middle.start}..{middle.stop - 1}")
        if self.repeats and (len(self.repeats) != len(self.kept_middle) or min(self.repeats) < 1
                             or sum(self.repeats) != len(middle)):
            raise ConfigError(f"repeats {self.repeats} must give each of the {len(self.kept_middle)} kept middle blocks "
                              f"a count >= 1, summing to the middle's {len(middle)} blocks")

    @classmethod
    def uniform(cls, num_blocks: int, bottom: int, top: int, emulator_layers: int) -> "SplitPlan":
        """Uniform layer drop: keep `emulator_layers` evenly spaced middle blocks, first and last included."""
        middle = list(range(bottom, num_blocks - top))
        if not 1 <= emulator_layers <= len(middle):
            raise ConfigError(f"emulator_layers must be in 1..{len(middle)}, got {emulator_layers}")
        if emulator_layers == 1:
            picks = [len(middle) // 2]
        else:
            picks = [round(i * (len(middle) - 1) / (emulator_layers - 1)) for i in range(emulator_layers)]
        return cls(num_blocks, bottom, top, tuple(middle[p] for p in picks))

    def nearest_spans(self) -> tuple[int, ...]:
        """Repeats that give every middle block to the nearest kept one (ties to the lower): the spans a
        uniform drop's kept blocks stand in for."""
        counts = dict.fromkeys(self.kept_middle, 0)
        for i in range(self.bottom, self.num_blocks - self.top):
            counts[min(self.kept_middle, key=lambda k: (abs(k - i), k))] += 1
        return tuple(counts[k] for k in self.kept_middle)

    @property
    def adapter_blocks(self) -> tuple[int, ...]:
        return tuple(range(self.bottom)) + tuple(range(self.num_blocks - self.top, self.num_blocks))

    @property
    def emulator_order(self) -> tuple[int, ...]:
        """Original indices of the emulator's blocks, in the emulator's order."""
        return tuple(range(self.bottom)) + self.kept_middle + tuple(range(self.num_blocks - self.top, self.num_blocks))

    def emulator_index(self, original: int) -> int:
        return self.emulator_order.index(original)

    def to_dict(self) -> dict:
        return {"num_blocks": self.num_blocks, "bottom": self.bottom, "top": self.top, "kept_middle": list(self.kept_middle),
                **({"extras": list(self.extras)} if self.extras else {}),  # older readers see the plan they know
                **({"repeats": list(self.repeats)} if self.repeats else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "SplitPlan":
        return cls(int(d["num_blocks"]), int(d["bottom"]), int(d["top"]), tuple(int(i) for i in d["kept_middle"]),
                   tuple(str(n) for n in d.get("extras", ())), tuple(int(r) for r in d.get("repeats", ())))
