"""Local training: the adapter on top of the frozen emulator, on data that never leaves this machine."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from offsite import lm, render
from offsite.checkpoint import Checkpointer
from offsite.emulator import methods
from offsite.emulator.bundle import describe_bundle, load_bundle
from offsite.emulator.realign import apply_patch
from offsite.errors import DataError, IntegrityError
from offsite.tensors import spec_digest, spec_of
from offsite.textdata import Example


def _paged_adamw_8bit(params, **kwargs):
    """On CUDA, bitsandbytes' paged 8-bit AdamW (QLoRA): moments in 8 bits, paged out under memory pressure."""
    import bitsandbytes as bnb
    return bnb.optim.PagedAdamW8bit(params, **kwargs)


def _as_examples(items) -> list[Example]:
    return [x if isinstance(x, Example) else Example(x) for x in items]


@dataclass(frozen=True)
class EncodingReport:
    """What the bundle's tokenizer made of a data file, before any training: logged by the client, printed by
    `offsite client check`."""
    examples: int
    tokens: int          # after truncation
    longest: int         # before truncation
    learned: int         # tokens the loss learns (completions, assistant turns, whole texts)
    truncated: int       # examples cut at max_length
    max_length: int

    def __str__(self) -> str:
        return (f"{self.examples} examples, {self.tokens} tokens ({self.learned} learned), mean "
                f"{self.tokens / max(self.examples, 1):.0f} and longest {self.longest} tokens; {self.truncated} "
                f"({self.truncated / max(self.examples, 1):.0%}) cut at max_length {self.max_length}")


def encode_checked(tokenizer, examples: list[Example | str], max_length: int,
                   truncate: bool = True) -> tuple[list[lm.Row], EncodingReport]:
    """Every example rendered with the job's tokenizer (offsite.render), truncated to max_length (unless
    they are to be packed into windows of it), and what that did. An example the tokenizer cannot render (a chat without a template, a template that refuses
    the conversation) is a DataError naming its position."""
    rows, longest, truncated, tokens, learned = [], 0, 0, 0, 0
    for i, example in enumerate(_as_examples(examples), 1):
        try:
            whole = render.render(tokenizer, example)
        except DataError as e:
            raise DataError(f"example {i}: {e}") from None
        kept = whole.truncated(max_length) if truncate else whole
        longest, truncated = max(longest, len(whole.ids)), truncated + (len(kept.ids) < len(whole.ids))
        tokens, learned = tokens + len(kept.ids), learned + sum(kept.learned)
        rows.append(lm.as_row(kept))
    return rows, EncodingReport(len(rows), tokens, longest, learned, truncated, max_length)


@dataclass(frozen=True)
class RoundResult:
    update: dict[str, torch.Tensor]   # the method's trainable tensors only: what is sealed and uploaded
    stats: lm.TrainStats
    heldout_before: float | None
    heldout_after: float | None
    trainable_params: int


class LocalTrainer:
    """Encodes the data once; each round starts from a freshly loaded, verified emulator with the global
    adapter in it, and the job's method attached (a PEFT module must not carry over between rounds)."""

    def __init__(self, bundle_dir: Path, examples: list[Example | str], heldout: list[Example | str] | None,
                 max_length: int, pack: bool = False, device: str = "cpu"):
        self.bundle_dir, self.device = bundle_dir, device
        self.tokenizer, self.plan, self.stored_dtype = describe_bundle(bundle_dir)  # frozen weights stay in that dtype
        rows, self.report = encode_checked(self.tokenizer, examples, max_length, truncate=not pack)
        self.train_set = lm.pack(rows, max_length) if pack else rows  # packed: fewer, fuller sequences
        self.heldout = encode_checked(self.tokenizer, heldout, max_length)[0] if heldout else None

    def _heldout_loss(self, model) -> float | None:
        return lm.mean_token_loss(model, self.heldout, render.pad_id(self.tokenizer)) if self.heldout else None

    def train_round(self, start: dict[str, torch.Tensor], skeleton_digest: str, cfg: lm.TrainConfig,
                    method: methods.MethodConfig = methods.MethodConfig(), desc: str = "train",
                    show_progress: bool = True, on_step=None, checkpoint: Checkpointer | None = None,
                    upload_dtype: torch.dtype | None = None,
                    emulator_patch: dict[str, torch.Tensor] | None = None) -> RoundResult:
        """Train one round from `start`. Seeded: the same inputs give the same update, interrupted
        (with a checkpoint) or not. The update is cast to `upload_dtype` (None: fp32, as it trained).
        `emulator_patch`: the job's re-aligned kept middle (offsite.emulator.realign), copied in first."""
        if spec_digest(spec_of(start)) != skeleton_digest:
            raise IntegrityError("the global adapter does not match the job's skeleton digest")
        model, _, _ = load_bundle(self.bundle_dir, self.device)
        if emulator_patch is not None:
            apply_patch(model, self.plan, emulator_patch)
        torch.manual_seed(cfg.seed)  # a method's fresh modules (LoRA's A) start the same every time
        model = methods.apply(model, self.plan, method, start, share=True)  # `start` is not needed after this
        if cfg.gradient_checkpointing:  # non-reentrant: gradients reach the bottom adapter through frozen inputs
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        before = self._heldout_loss(model)
        model, params = methods.attach(model, self.plan, method, total_steps=lm.total_steps(len(self.train_set), cfg))
        shared = {t.data_ptr() for t in start.values()}
        for p in params:  # what trains gets storage of its own: the caller's `start` stays as it was
            if p.data_ptr() in shared:
                p.data = p.data.clone()
        self.model = model  # the round's model, for inspection after training
        stats = lm.train(model, self.train_set, params, render.pad_id(self.tokenizer), cfg, desc, show_progress, on_step,
                         checkpoint, optimizer=_paged_adamw_8bit if self.device.startswith("cuda") else None,
                         **methods.training_hooks(model, method))
        return RoundResult(methods.trainable_state(model, self.plan, method, dtype=upload_dtype), stats, before, self._heldout_loss(model),
                           sum(p.numel() for p in params))
