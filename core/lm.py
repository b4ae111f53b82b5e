"""The one language-model loop everybody uses: encode, batch, measure mean token loss, train.

Pretraining, the client's adapter training, the central baseline and every evaluation go through
these functions, so their numbers are comparable.
"""
from __future__ import annotations

import logging
import math
import random
import resource
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Iterator

import torch
from tqdm import tqdm

from offsite import render
from offsite.checkpoint import Checkpointer
from offsite.chunked_loss import IGNORE, next_token_loss_sum, token_loss_sum  # noqa: F401 (lm is where callers find them)
from offsite.errors import ConfigError

log = logging.getLogger("offsite")


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether bf16 autocast pays on this CPU: measured, not guessed from flags. With AMX bf16 matmuls
    ran ~2x faster than fp32 and training nearly doubled its speed; on a CPU that has avx512_bf16 but
    no AMX they ran 1.5x slower, and the demo's pretraining 3x slower. A few milliseconds, once."""
    a, b = torch.randn(256, 512), torch.randn(512, 512)

    def seconds(dtype: torch.dtype) -> float:
        x, y = a.to(dtype), b.to(dtype)
        x @ y  # warm-up: kernel selection
        start = time.perf_counter()
        for _ in range(8):
            x @ y
        return time.perf_counter() - start

    return seconds(torch.bfloat16) < 0.7 * seconds(torch.float32)  # a clear margin, so the choice is stable


def encode(tokenizer, texts: Iterable[str], max_len: int) -> list[list[int]]:
    """Each text as offsite.render makes it (the tokenizer's own BOS, then EOS), truncated to max_len."""
    return [ids[:max_len] for ids in render.texts_ids(tokenizer, list(texts))]


# An encoded example is its token ids, or (ids, learned) where learned[i] says whether token i is scored:
# a prompt's tokens are context, not targets.
Row = list[int] | tuple[list[int], list[bool]]


def _ids(row: Row) -> list[int]:
    return row if isinstance(row, list) else row[0]


def as_row(r: render.Rendered) -> Row:
    """A rendered example as a Row: its ids alone where every token is learned."""
    return r.ids if all(r.learned) else (r.ids, r.learned)


def encode_examples(tokenizer, examples, max_len: int) -> list[Row]:
    """Each example as offsite.render makes it, truncated to max_len: plain texts learn every token,
    prompt + completion and chat examples only the completion (the assistant's turn)."""
    return [as_row(render.render(tokenizer, e).truncated(max_len)) for e in examples]


def pack(encoded: list[Row], seq_len: int) -> list[Row]:
    """Concatenate examples and cut into full windows of seq_len (running text, or many short examples
    in few sequences); what was not learned stays unlearned."""
    flat = [t for x in encoded for t in _ids(x)]
    learned = [b for x in encoded for b in (x[1] if isinstance(x, tuple) else [True] * len(x))]
    windows = range(0, len(flat) - seq_len + 1, seq_len)
    if all(learned):
        return [flat[i : i + seq_len] for i in windows]
    return [(flat[i : i + seq_len], learned[i : i + seq_len]) for i in windows]


def batches(
    encoded: list[Row], batch_size: int, pad_id: int, shuffle: bool = False, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Right-padded (input_ids, attention_mask, labels) batches; labels ignore padding and prompts."""
    order = list(range(len(encoded)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for start in range(0, len(order), batch_size):
        rows = [encoded[i] for i in order[start : start + batch_size]]
        width = max(len(_ids(r)) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        scored = torch.zeros((len(rows), width), dtype=torch.bool)
        for j, r in enumerate(rows):
            n = len(_ids(r))
            ids[j, :n] = torch.tensor(_ids(r))
            mask[j, :n] = 1
            scored[j, :n] = True if isinstance(r, list) else torch.tensor(r[1])
        yield ids, mask, ids.masked_fill(~scored, IGNORE)


def launched_state():
    """accelerate's `PartialState` when this process is one of several (`accelerate launch`, torchrun),
    else None: a plain run never touches torch.distributed. ACCELERATE_USE_CPU=1 runs them on CPU (gloo)."""
    from accelerate import PartialState
    from accelerate.utils import get_int_from_env, parse_flag_from_env

    world = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)
    if world <= 1:
        return None
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    if state.num_processes != world:  # accelerate found no GPU backend: each process would think it is alone
        raise ConfigError(f"started as {world} processes but found no GPUs for them; set ACCELERATE_USE_CPU=1 to run them on CPU")
    return state


def input_device(model) -> torch.device:
    """Where a model's inputs go: its first weight's device, or for a model placed over several devices
    (accelerate's device_map, whose hooks move activations between them) the device of its first module."""
    placed = getattr(model, "hf_device_map", None)
    if placed:
        first = next(iter(placed.values()))
        return torch.device("cpu" if first in ("cpu", "disk") else first if isinstance(first, str) else f"cuda:{first}")
    return next(model.parameters()).device


@torch.no_grad()
def loss_sum_count(model, encoded: list[list[int]], pad_id: int, batch_size: int = 32, bf16: bool = False) -> tuple[float, int]:
    """Summed token loss and token count; examples are batched by length so little is padding."""
    model.eval()
    device = input_device(model)
    by_length = sorted(encoded, key=lambda r: len(_ids(r)))
    total, count = 0.0, 0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for ids, mask, labels in batches(by_length, batch_size, pad_id):
            loss, n = token_loss_sum(model, ids.to(device), mask.to(device), labels.to(device))
            total, count = total + float(loss), count + n
    return total, count


def sharded_loss_sum_count(model, encoded: list[Row], pad_id: int, state, batch_size: int = 32,
                           bf16: bool = False) -> tuple[float, int]:
    """loss_sum_count over all of `state`'s processes: each scores every N-th example by length (an even
    share of the work) and the sums are added up, so every process returns the total."""
    from accelerate.utils import reduce

    shard = sorted(encoded, key=lambda r: len(_ids(r)))[state.process_index :: state.num_processes]
    total, count = loss_sum_count(model, shard, pad_id, batch_size, bf16)
    summed = reduce(torch.tensor([total, count], dtype=torch.float64, device=next(model.parameters()).device), "sum")
    return float(summed[0]), int(summed[1])


def mean_token_loss(model, encoded: list[list[int]], pad_id: int, batch_size: int = 32, bf16: bool = False,
                    state=None) -> float:
    """Held-out mean token loss (nats per token) of `model` on encoded examples; with a `launched_state()`,
    data-parallel over its processes."""
    if state is None:
        total, count = loss_sum_count(model, encoded, pad_id, batch_size, bf16)
    else:
        total, count = sharded_loss_sum_count(model, encoded, pad_id, state, batch_size, bf16)
    return total / max(count, 1)


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 1.0
    lr: float = 3e-3
    batch_size: int = 16
    warmup_steps: int = 10
    weight_decay: float = 0.0
    seed: int = 0
    bf16: bool = False
    max_steps: int | None = None
    grad_accum: int = 1       # micro-batches per optimizer step: a large effective batch in little memory
    gradient_checkpointing: bool = False  # recompute block activations in backward: less memory, ~30% more compute
    prox_mu: float = 0.0      # FedProx (Li et al. 2020): mu / 2 * ||w - w_start||^2 joins the loss; 0: off
    schedule: tuple[float, float] = (0.0, 1.0)  # the part of the lr schedule this run covers (a job-wide one: round r of R
                                                # covers (r / R, (r + 1) / R)); warmup only where it starts at 0

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.lr <= 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"epochs, lr, batch_size and grad_accum must be positive: {self}")
        if not (math.isfinite(self.prox_mu) and self.prox_mu >= 0):
            raise ValueError(f"prox_mu must be finite and >= 0, got {self.prox_mu}")
        start, end = self.schedule
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"schedule must be a part (start, end) of [0, 1] with start < end, got {self.schedule}")


@dataclass(frozen=True)
class TrainStats:
    steps: int
    tokens: int
    seconds: float
    last_loss: float
    peak_memory_bytes: int = 0   # the process's peak RSS on CPU; peak allocated memory on CUDA
    mean_loss: float = float("nan")  # token-weighted over the micro-batches this run trained (after a resume: since it)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def lr_multiplier(step: int, total: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step `step` of `total`, as a multiple of cfg.lr: linear warmup over the
    first warmup_steps (only where the schedule starts, at 0), then cosine decay from 1 to 0.1 over the
    schedule. A run that covers the part (start, end) of it (cfg.schedule) follows that part only, so that
    the rounds of a job together make one warmup and one decay instead of one each."""
    start, end = cfg.schedule
    warmup = cfg.warmup_steps if start == 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = start + (end - start) * (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def proximal_term(params: list[torch.nn.Parameter], anchors: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's mu / 2 * ||w - w_start||^2 over the trainables: it keeps a client's local steps near the
    global adapter it started from, which damps client drift on non-IID data."""
    return 0.5 * mu * sum(((p.float() - a) ** 2).sum() for p, a in zip(params, anchors))


def total_steps(examples: int, cfg: TrainConfig) -> int:
    """Optimizer steps a run of `cfg` takes over `examples` examples."""
    total = max(1, round(math.ceil(examples / cfg.batch_size) * cfg.epochs / cfg.grad_accum))
    return total if cfg.max_steps is None else min(total, cfg.max_steps)


def train(model, encoded: list[Row], params: list[torch.nn.Parameter], pad_id: int, cfg: TrainConfig,
          desc: str = "train", show_progress: bool = True, on_step: Callable[[int, int], None] | None = None,
          checkpoint: Checkpointer | None = None, optimizer: Callable | None = None,
          regularizer: Callable[[], torch.Tensor] | None = None,
          after_optimizer_step: Callable[[int], None] | None = None) -> TrainStats:
    """AdamW with linear warmup and cosine decay over `cfg.epochs` passes of `encoded`.

    `on_step(step, total)` runs after every optimizer step (the client reports progress with it). With a
    `checkpoint`, training saves every `checkpoint.every` steps (or `every_s` seconds) and resumes from the last save: the data
    order depends only on the seed and epoch, so a resumed run takes the same steps as an unbroken one.
    `optimizer(params, lr, betas, weight_decay)` replaces torch's AdamW (e.g. bitsandbytes' paged 8-bit).
    `regularizer()` is added to each micro-batch's loss; `after_optimizer_step(step)` runs after the
    optimizer step, while the gradients are still there (AdaLoRA's rank allocation reads them).
    """
    micro_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total = total_steps(len(encoded), cfg)
    opt = (optimizer or torch.optim.AdamW)(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    # FedProx's anchor: the round's start, taken before a resume loads later values (fp32, one copy of the trainables)
    anchors = [p.detach().float().clone() for p in params] if cfg.prox_mu else None

    step, epoch, skip = 0, 0, 0
    resumed = checkpoint.restore(params, opt) if checkpoint else None
    if resumed:
        step, epoch, skip = resumed["step"], resumed["epoch"], resumed["batch"]
        log.info("%s: resuming training at step %d of %d from %s", desc, step, total, checkpoint.path)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, total, cfg), last_epoch=step - 1)
    device = input_device(model)
    model.train()
    last, micro, tokens, loss_total = float("nan"), 0, 0, 0.0
    start = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc=desc, disable=not show_progress, mininterval=2.0)
    while step < total:
        for index, (ids, mask, labels) in enumerate(batches(encoded, cfg.batch_size, pad_id, shuffle=True, seed=cfg.seed + epoch)):
            if index < skip:  # resuming: these micro-batches went into steps already taken
                continue
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                loss_sum, n = token_loss_sum(model, ids.to(device), mask.to(device), labels.to(device))
            loss = (loss_sum / max(n, 1) + (regularizer() if regularizer else 0.0)
                    + (proximal_term(params, anchors, cfg.prox_mu) if anchors else 0.0))
            (loss / cfg.grad_accum).backward()
            summed = float(loss_sum.detach())
            micro, tokens, last, loss_total = micro + 1, tokens + n, summed / max(n, 1), loss_total + summed
            if micro < cfg.grad_accum and index + 1 < micro_per_epoch:
                continue  # accumulate; an epoch's last micro-batches step even if fewer
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if after_optimizer_step is not None:
                after_optimizer_step(step)
            sched.step()
            opt.zero_grad(set_to_none=True)
            step, micro = step + 1, 0
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{last:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}", refresh=False)
            bar.update(1)
            if checkpoint and step < total and checkpoint.due(step):
                checkpoint.save(params, opt, {"step": step, "epoch": epoch, "batch": index + 1})
            if on_step is not None:
                on_step(step, total)
            if step >= total:
                break
        epoch, skip = epoch + 1, 0
    bar.close()
    model.eval()
    if checkpoint:
        checkpoint.clear()
    return TrainStats(steps=step, tokens=tokens, seconds=time.perf_counter() - start, last_loss=last,
                      peak_memory_bytes=peak_memory_bytes(device), mean_loss=loss_total / tokens if tokens else float("nan"))
