"""The upper bound the paper compares against: the full model fine-tuned on the pooled client data.

Only an experimenter who holds every client's data can compute this; it is not part of the system.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from offsite import lm
from offsite.emulator.build import load_base
from offsite.emulator.evaluate import exact_match, losses
from offsite.textdata import Example, read_examples, read_tasks, read_texts


@dataclass(frozen=True)
class Central:
    loss: dict[str, float]                                     # held-out loss per eval set, and "all"
    accuracy: dict[str, float] = field(default_factory=dict)   # exact match per task set, and "all"


def full_finetune(base: str, examples: list[Example], epochs: float, lr: float, batch_size: int, max_length: int,
                  seed: int, chat_template: str | None = None, show_progress: bool = True):
    """The whole base fine-tuned on `examples` in any format, rendered as clients render them (chats with a
    job's `chat_template` where the base has none), and its tokenizer: the upper bound's model."""
    model, tokenizer = load_base(base, chat_template=chat_template)
    lm.train(model, lm.encode_examples(tokenizer, examples, max_length), list(model.parameters()), tokenizer.pad_token_id,
             lm.TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, bf16=lm.cpu_has_fast_bf16()),
             desc="central full fine-tune", show_progress=show_progress)
    return model, tokenizer


def central_finetune(base: str, train_files: list[Path], eval_files: dict[str, Path], epochs: float, lr: float,
                     batch_size: int, max_length: int, seed: int, task_files: dict[str, Path] | None = None) -> Central:
    """Held-out loss (and exact match on `task_files`) of the fully fine-tuned model."""
    model, tokenizer = full_finetune(base, [e for f in train_files for e in read_examples(f)], epochs, lr, batch_size,
                                     max_length, seed)
    pad = tokenizer.pad_token_id
    sets = {name: lm.encode(tokenizer, read_texts(f), max_length) for name, f in eval_files.items()}
    loss = {"all": losses({"m": model}, [x for enc in sets.values() for x in enc], pad)["m"]}
    loss.update({name: losses({"m": model}, enc, pad)["m"] for name, enc in sets.items()})
    tasks = {name: read_tasks(f) for name, f in (task_files or {}).items()}
    accuracy = {name: round(exact_match(model, tokenizer, t), 4) for name, t in tasks.items()}
    if tasks:
        accuracy["all"] = round(sum(accuracy[n] * len(t) for n, t in tasks.items()) / sum(map(len, tasks.values())), 4)
    return Central(loss, accuracy)
