"""Byzantine-robust ways to combine a round's proposals (the global adapter each client proposes).

The weighted mean trusts every client: one Byzantine client (faulty or hostile) moves it anywhere it likes
by sending a large enough proposal. These rules bound what a minority can do: the coordinate-wise median
and trimmed mean (Yin, Chen, Ramchandran, Bartlett 2018, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates") and Krum and multi-Krum (Blanchard, El Mhamdi, Guerraoui, Stainer 2017,
"Machine Learning with Adversaries: Byzantine Tolerant Gradient Descent"). All are unweighted, as in those
papers: a client's example count is only its own claim.

Memory: a proposal can be gigabytes and a round can have dozens, so no proposal is held whole. A rule reads
the safetensors files tensor by tensor, large tensors in blocks of rows along dim 0, holding about `budget`
float64 values at once over all n files (0-d and 1-d tensors are read whole); sorting a block takes a few
times its size. Besides that there is only the float64 result (and Krum's n x n distances). Values are
finite: uploads are checked for that before they are stored (offsite.tensors).
"""
from __future__ import annotations

import math
from contextlib import ExitStack
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import EllipsisType
from typing import Callable, ClassVar, Iterator, Protocol

import torch
from safetensors import safe_open

from offsite.cloud.aggregate import Tensors, from_registry
from offsite.errors import ConfigError, InvalidUpdateError

DEFAULT_BUDGET = 2**24  # float64 values held at once over all proposals: 128 MiB


class Combiner(Protocol):
    """A rule that turns a round's proposals into one float64 adapter (the caller casts it)."""

    name: ClassVar[str]

    def min_updates(self) -> int:
        """The fewest proposals the rule is defined for."""

    def combine(self, paths: list[Path], budget: int = DEFAULT_BUDGET) -> Tensors:
        """The combined adapter: float64 tensors with the proposals' names and shapes."""


@dataclass(frozen=True)
class Median:
    """Coordinate-wise median (Yin et al. 2018). For even n the mean of the two middle values, as
    numpy.median (torch.median would return the lower one)."""

    name: ClassVar[str] = "median"

    def min_updates(self) -> int:
        return 1

    def combine(self, paths: list[Path], budget: int = DEFAULT_BUDGET) -> Tensors:
        n = len(paths)
        return _coordinatewise(paths, self, budget, lambda s: (s[(n - 1) // 2] + s[n // 2]) / 2)


@dataclass(frozen=True)
class TrimmedMean:
    """Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate drop the k = floor(trim * n) largest
    and k smallest values and average the other n - 2k."""

    name: ClassVar[str] = "trimmed_mean"
    trim: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.trim < 0.5:
            raise ConfigError(f"trim must be in [0, 0.5), got {self.trim!r}")

    def min_updates(self) -> int:
        return 1

    def trimmed(self, n: int) -> int:
        """k for n proposals, the floor of the decimal as written (in binary 0.29 * 100 is 28.999...)."""
        return math.floor(Fraction(str(self.trim)) * n)

    def combine(self, paths: list[Path], budget: int = DEFAULT_BUDGET) -> Tensors:
        n, k = len(paths), self.trimmed(len(paths))
        return _coordinatewise(paths, self, budget, lambda s: s[k:n - k].mean(dim=0))


@dataclass(frozen=True)
class Selection:
    """What Krum chose, for tests and logs: every proposal's score (lower is more central) and the indices
    of the chosen proposals, lowest score first (ties: lowest index)."""

    scores: list[float]
    selected: list[int]


@dataclass(frozen=True)
class Krum:
    """Krum (Blanchard et al. 2017): score(i) = sum of squared L2 distances (over all values) from proposal
    i to its n - f - 2 closest others; the result is the proposal with the lowest score. Defined for
    n > 2f + 2."""

    name: ClassVar[str] = "krum"
    byzantine: int = 1

    def __post_init__(self) -> None:
        _require_count("byzantine", self.byzantine)

    def min_updates(self) -> int:
        return 2 * self.byzantine + 3

    def kept(self, n: int) -> int:
        """How many of the lowest-scored proposals are averaged."""
        return 1

    def select(self, paths: list[Path], budget: int = DEFAULT_BUDGET) -> Selection:
        """Score every proposal from exact pairwise distances (differences, not the Gram-matrix identity,
        which cancels badly when proposals are close), summed in float64 block by block."""
        shapes = _check(paths, self.min_updates(), repr(self), budget)
        n = len(paths)
        dist = torch.zeros(n, n, dtype=torch.float64)
        for _, _, block in _blocks(paths, shapes, budget):
            x = block.reshape(n, math.prod(block.shape[1:]))
            dist += torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").square_()
        closest = n - self.byzantine - 2
        scores = [torch.cat((dist[i, :i], dist[i, i + 1:])).sort().values[:closest].sum().item() for i in range(n)]
        ranked = sorted(range(n), key=lambda i: (scores[i], i))
        return Selection(scores, ranked[:self.kept(n)])

    def combine(self, paths: list[Path], budget: int = DEFAULT_BUDGET) -> Tensors:
        return mean([paths[i] for i in self.select(paths, budget).selected], budget)


@dataclass(frozen=True)
class MultiKrum(Krum):
    """Multi-Krum (Blanchard et al. 2017): the unweighted mean of the `keep` proposals with the lowest Krum
    scores, computed once; keep 0 means n - f. Defined for n > 2f + 2 and n >= keep."""

    name: ClassVar[str] = "multi_krum"
    keep: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_count("keep", self.keep)

    def min_updates(self) -> int:
        return max(super().min_updates(), self.keep)

    def kept(self, n: int) -> int:
        return self.keep or n - self.byzantine


COMBINERS: dict[str, type[Median | TrimmedMean | Krum | MultiKrum]] = {
    cls.name: cls for cls in (Median, TrimmedMean, Krum, MultiKrum)}


def make_combiner(name: str, **params: float) -> Combiner:
    """The combiner a job config names, with its parameters; every mistake is a ConfigError."""
    return from_registry(COMBINERS, "combiner", name, params)


def mean(paths: list[Path], budget: int = DEFAULT_BUDGET) -> Tensors:
    """The unweighted float64 mean of the proposals, streamed block by block (what multi-Krum averages)."""
    shapes = _check(paths, 1, "mean", budget)
    return _reduce(paths, shapes, budget, lambda block: block.mean(dim=0))


def _coordinatewise(paths: list[Path], combiner: Combiner, budget: int,
                    of_sorted: Callable[[torch.Tensor], torch.Tensor]) -> Tensors:
    """Apply `of_sorted` to every block sorted along the proposals' axis."""
    shapes = _check(paths, combiner.min_updates(), repr(combiner), budget)
    return _reduce(paths, shapes, budget, lambda block: of_sorted(block.sort(dim=0).values))


def _reduce(paths: list[Path], shapes: dict[str, tuple[int, ...]], budget: int,
            reduce: Callable[[torch.Tensor], torch.Tensor]) -> Tensors:
    """Reduce every (n, ...) block over its first axis into a preallocated float64 result."""
    out = {name: torch.empty(shape, dtype=torch.float64) for name, shape in shapes.items()}
    for name, index, block in _blocks(paths, shapes, budget):
        out[name][index] = reduce(block)
    return out


def _blocks(paths: list[Path], shapes: dict[str, tuple[int, ...]],
            budget: int) -> Iterator[tuple[str, slice | EllipsisType, torch.Tensor]]:
    """(name, where it goes in the result, the float64 block of all n proposals) for every tensor: 0-d and
    1-d tensors whole, others in blocks of rows = max(1, budget // (n * values per row))."""
    n = len(paths)
    with ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(p), framework="pt")) for p in paths]
        for name, shape in shapes.items():
            if len(shape) < 2:
                yield name, ..., _stacked(files, name, ..., shape)
                continue
            rows = max(1, budget // (n * max(1, math.prod(shape[1:]))))
            for a in range(0, shape[0], rows):
                b = min(a + rows, shape[0])
                yield name, slice(a, b), _stacked(files, name, slice(a, b), (b - a, *shape[1:]))


def _stacked(files: list, name: str, index: slice | EllipsisType, shape: tuple[int, ...]) -> torch.Tensor:
    """One block of every file, upcast into one float64 tensor (one file's native block extra at a time)."""
    block = torch.empty((len(files), *shape), dtype=torch.float64)
    for i, f in enumerate(files):
        block[i] = f.get_tensor(name) if index is ... else f.get_slice(name)[index]
    return block


def _check(paths: list[Path], need: int, rule: str, budget: int) -> dict[str, tuple[int, ...]]:
    """The proposals' tensor names and shapes, refusing too few proposals or any unlike the first."""
    if budget < 1:
        raise ConfigError(f"budget must be a positive number of values, got {budget!r}")
    if len(paths) < need:
        raise InvalidUpdateError(f"{rule} is defined for n >= {need} updates, got n={len(paths)}")
    first: dict[str, tuple[int, ...]] = {}
    for i, path in enumerate(paths):
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        if i == 0:
            first = shapes
        elif shapes != first:
            raise InvalidUpdateError(f"proposal {i} ({path}) has tensor names or shapes unlike proposal 0's")
    return first


def _require_count(field: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{field} must be a whole number >= 0, got {value!r}")
