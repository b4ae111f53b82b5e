"""What one job adds to its base model, held beside the one shared copy of the base.

A job's global adapter is its adapter blocks, dense (the coordinator averages merged updates), plus what
its method keeps beside them. A `JobAdapter` holds only what differs from the base: for LoRA and AdaLoRA,
whose aggregate is a sum of low-rank changes, low-rank factors of each linear layer's change, applied on
the job's rows inside the base's own blocks (routing.Delta); otherwise its own copy of each adapter block
whose tensors changed (with bottleneck modules inside where the method adds them); prompt tuning's virtual
token embeddings, or prefix tuning's keys and values for every layer. `AdapterCache` loads them on first use and
evicts the least recently used under a byte budget, never one that a running request holds.
"""
from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from offsite.cloud.infer.routing import Delta, Router
from offsite.emulator import bottleneck, methods
from offsite.emulator.methods import MethodConfig
from offsite.emulator.plan import SplitPlan
from offsite.errors import ConfigError, InvalidUpdateError, UnsupportedModelError


class AdapterMemoryError(Exception):
    """An adapter does not fit in the budget, even with every idle adapter evicted."""


FACTOR_METHODS = ("lora", "adalora")   # their aggregate is a sum of low-rank changes: it is served as factors
FACTOR_TOLERANCE = 1e-5    # relative error of a change rebuilt from its factors, at most
FACTOR_MAX_RANK = 512      # a change of higher rank is served as a dense block
FIRST_RANK_GUESS = 32      # the randomized SVD starts this wide (N clients x r is often less) and widens


@dataclass
class JobAdapter:
    job_id: str
    blocks: dict[int, nn.Module]                          # block index -> the job's version of that block
    deltas: dict[tuple[int, str], Delta] = field(default_factory=dict)  # (block, linear) -> low-rank change, on the base's
    prompt: torch.Tensor | None = None                    # prompt tuning: (virtual tokens, hidden) input embeddings
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # prefix tuning: per layer (1, heads, tokens, dim) k, v
    outer: dict[str, nn.Module] = field(default_factory=dict)  # module name -> the job's final norm, embeddings, head
    nbytes: int = 0
    users: int = field(default=0, repr=False)             # running requests that hold it

    @property
    def virtual_tokens(self) -> int:
        if self.prompt is not None:
            return self.prompt.shape[0]
        return self.prefix[0][0].shape[-2] if self.prefix else 0


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def build_adapter(job_id: str, model: nn.Module, router: Router, plan: SplitPlan, method: MethodConfig,
                  adapter: dict[str, torch.Tensor]) -> JobAdapter:
    """The job's part, from its global adapter (canonical names): a copy of a base block only where the
    job's tensors differ from the base's, and of each outer module (norm, embeddings, head) that holds a
    tensor the job trained beyond its blocks."""
    base_blocks, block_path = router.base_blocks, router.path
    if plan.num_blocks != len(base_blocks):
        raise InvalidUpdateError(f"job {job_id} was split from a {plan.num_blocks}-block model; this base has {len(base_blocks)}")
    extras = {k: v for k, v in adapter.items() if k == methods.PROMPT}
    blocks: dict[int, nn.Module] = {}
    deltas: dict[tuple[int, str], Delta] = {}
    for index in plan.adapter_blocks:
        prefix = f"{block_path}.{index}."
        mine = {k[len(prefix):]: v for k, v in adapter.items() if k.startswith(prefix)}
        base = base_blocks[index]
        own = dict(base.named_parameters())
        if method.name != "bottleneck" and set(mine) == set(own) and all(
                torch.equal(own[n].detach(), v.to(own[n].dtype)) for n, v in mine.items()):
            continue  # unchanged (prompt and prefix tuning leave the blocks as they are): the base's serves
        if method.name in FACTOR_METHODS and set(mine) == set(own):
            factors = _low_rank(base, own, mine)
            if factors is not None:
                deltas.update({(index, name): delta for name, delta in factors.items()})
                continue
        if method.name != "bottleneck" and set(mine) - set(own):
            raise InvalidUpdateError(f"job {job_id}: adapter block {index} has tensors the base lacks: {sorted(set(mine) - set(own))[:3]}")
        block = _copy_with(base, mine, f"job {job_id}: {prefix}")
        if method.name == "bottleneck":  # its fresh init is overwritten below: it must not draw from others' RNG
            with torch.random.fork_rng(devices=[]):
                bottleneck.install_in_block(block, model.config.hidden_size, method.bottleneck_dim)
            own = dict(block.named_parameters())
            if set(own) != set(mine):
                missing, extra = sorted(set(own) - set(mine)), sorted(set(mine) - set(own))
                raise InvalidUpdateError(f"job {job_id}: adapter block {index} does not fit the base: missing {missing[:3]}, extra {extra[:3]}")
            with torch.no_grad():
                for name, param in own.items():
                    if bottleneck.is_bottleneck(f".{name}"):
                        _check_shape(param, mine[name], f"job {job_id}: {prefix}{name}")
                        param.copy_(mine[name])
        blocks[index] = block.eval()
    job = JobAdapter(job_id, blocks, deltas, outer=_outer(job_id, router, plan, adapter))
    if method.name == "prompt":
        job.prompt = extras[methods.PROMPT].to(model.get_input_embeddings().weight.device)
    elif method.name == "prefix":
        job.prefix = _prefix_cache(model, plan, method, extras[methods.PROMPT])
    job.nbytes = (_nbytes(t for b in blocks.values() for t in b.state_dict().values())
                  + _nbytes(t for d in deltas.values() for t in (d.down, d.up))
                  + (_nbytes([job.prompt]) if job.prompt is not None else 0)
                  + (_nbytes(t for kv in job.prefix for t in kv) if job.prefix else 0)
                  + _nbytes({t.data_ptr(): t for m in job.outer.values() for t in m.parameters()}.values()))  # a tied pair once
    return job


def _outer(job_id: str, router: Router, plan: SplitPlan, adapter: dict[str, torch.Tensor]) -> dict[str, nn.Module]:
    """The job's copy of every outer module whose parameters it trained (a tied head and the embeddings each
    get one, holding the job's one matrix)."""
    out, served = {}, set()
    for name, o in router.outer.items():
        mine = {attr: adapter[canonical] for attr, canonical in o.params.items() if canonical in plan.extras}
        if mine:
            out[name] = _copy_with(o.module, {**{a: p.detach() for a, p in o.module.named_parameters(recurse=False)}, **mine},
                                   f"job {job_id}: {name}.").eval()
            served.update(o.params[a] for a in mine)
    if set(plan.extras) - served:
        raise InvalidUpdateError(f"job {job_id} trained {sorted(set(plan.extras) - served)[:3]}, which this base's "
                                 f"engine cannot tell the module of")
    return out


def _low_rank(base: nn.Module, own: dict[str, torch.Tensor], mine: dict[str, torch.Tensor]) -> dict[str, Delta] | None:
    """The block's change as low-rank deltas on its linear layers, or None if it is not that: a tensor
    other than a linear weight changed, or a change needs more than FACTOR_MAX_RANK (or than half the
    layer's size) to be rebuilt within FACTOR_TOLERANCE. A half-precision merge's rounding is not low-rank:
    such a job is served dense, exactly as exported."""
    linears = {name: m for name, m in base.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}
    out = {}
    for name, value in mine.items():
        if torch.equal(own[name].detach(), value.to(own[name].dtype)):
            continue
        layer = name.removesuffix(".weight")
        if not name.endswith(".weight") or layer not in linears:
            return None
        change = value.float() - own[name].detach().float()
        matrix = change if type(linears[layer]).__name__ == "Conv1D" else change.T      # (in, out): y += x @ matrix
        cap = min(FACTOR_MAX_RANK, matrix.shape[0] * matrix.shape[1] // (2 * sum(matrix.shape)))
        if cap < 1:
            return None
        q = min(FIRST_RANK_GUESS, cap)
        while True:  # a randomized SVD of a few more columns than the rank, widened until the rank fits
            u, s, v = torch.svd_lowrank(matrix, q=min(q + 8, min(matrix.shape)), niter=4)
            rank = int((s > s[0] * FACTOR_TOLERANCE).sum()) if s.numel() and s[0] > 0 else 0
            if rank < q or q >= cap:
                break
            q = min(4 * q, cap)
        if rank == 0 or rank > cap:
            return None
        down, up = u[:, :rank] * s[:rank], v[:, :rank].T.contiguous()
        error = torch.linalg.matrix_norm(down @ up - matrix) / torch.linalg.matrix_norm(matrix)
        if error > FACTOR_TOLERANCE * 10:
            return None
        out[layer] = Delta(down.contiguous(), up)
    return out


def _check_shape(param: torch.Tensor, value: torch.Tensor, what: str) -> None:
    if param.shape != value.shape:
        raise InvalidUpdateError(f"{what} has shape {list(value.shape)}, the base {list(param.shape)}")


def _copy_with(base: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> nn.Module:
    """A copy of `base` whose parameters are `tensors` (in the base's dtypes; the very tensors where they
    already are): deepcopy's memo stands the new parameters in for the base's, so the base's weights are
    never copied only to be overwritten. Buffers (small) are copied."""
    memo = {}
    for name, param in base.named_parameters():
        if name not in tensors:
            continue   # a bottleneck block's base has no such tensors yet; the rest is checked by the caller
        _check_shape(param, tensors[name], f"{what}{name}")
        memo[id(param)] = nn.Parameter(tensors[name].to(param.dtype), requires_grad=False)
    missing = [n for n, p in base.named_parameters() if id(p) not in memo]
    if missing:
        raise InvalidUpdateError(f"{what}: the adapter lacks {missing[:3]}")
    return copy.deepcopy(base, memo)


def _prefix_cache(model: nn.Module, plan: SplitPlan, method: MethodConfig, tokens: torch.Tensor):
    """Prefix tuning's per-layer keys and values for the full model, laid out as peft's `get_prompt` lays
    them out (its reshape, without running a wrapper around the shared base)."""
    from peft import PrefixTuningConfig
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING
    from peft.utils.other import _prepare_prompt_learning_config

    model_type = model.config.model_type
    if model_type in TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING or "gemma" in model_type:
        raise UnsupportedModelError(f"serving a prefix-tuned {model_type} job is not supported: its prefix needs "
                                    "peft's per-family cache layout")
    cfg = _prepare_prompt_learning_config(PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method.virtual_tokens),
                                          model.config)
    full = methods._full_depth(tokens, plan).to(model.dtype)
    heads = cfg.num_attention_heads
    kv = full.view(1, cfg.num_virtual_tokens, cfg.num_layers * 2, heads, cfg.token_dim // heads)
    per_layer = kv.permute([2, 0, 3, 1, 4]).split(2)  # a decoder has one transformer submodule: (k, v) per layer
    return [(layer[0].contiguous(), layer[1].contiguous()) for layer in per_layer]


class AdapterCache:
    """Resident job adapters, least recently used first, within `budget` bytes (None: no limit)."""

    def __init__(self, load: Callable[[str], JobAdapter], budget: int | None = None):
        if budget is not None and budget < 0:
            raise ConfigError(f"adapter memory must be >= 0 bytes, got {budget}")
        self._load, self.budget = load, budget
        self._resident: OrderedDict[str, JobAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = self.evictions = 0

    def acquire(self, job_id: str) -> JobAdapter:
        """The job's adapter, loaded if it is not resident, held until `release`."""
        with self._lock:
            job = self._resident.get(job_id)
            if job is not None:
                self._resident.move_to_end(job_id)
                job.users += 1
                return job
        job = self._load(job_id)  # outside the lock: loading reads a blob from disk
        with self._lock:
            if job_id in self._resident:      # another caller loaded it meanwhile
                job = self._resident[job_id]
            else:
                self._make_room(job)
                self._resident[job_id] = job
                self.loads += 1
            self._resident.move_to_end(job_id)
            job.users += 1
            return job

    def release(self, job: JobAdapter) -> None:
        with self._lock:
            job.users -= 1

    def _make_room(self, job: JobAdapter) -> None:
        if self.budget is None:
            return
        for job_id in list(self._resident):
            if self.resident_bytes + job.nbytes <= self.budget:
                break
            if self._resident[job_id].users == 0:
                del self._resident[job_id]
                self.evictions += 1
        if self.resident_bytes + job.nbytes > self.budget:
            raise AdapterMemoryError(f"job {job.job_id}'s adapter needs {job.nbytes:,} bytes; the adapter memory "
                                     f"({self.budget:,} bytes) holds {self.resident_bytes:,} in adapters now in use")

    @property
    def resident_bytes(self) -> int:
        return sum(j.nbytes for j in self._resident.values())

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._resident)
