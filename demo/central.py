"""The upper bound the paper compares against: the full model fine-tuned on the pooled client data.

Only an experimenter who holds every client's data can compute this; it is not part of the system.
"""
from __future__ import annotations

from pathlib import Path

from offsite import lm
from offsite.emulator.build import load_base
from offsite.emulator.evaluate import losses
from offsite.textdata import read_texts


def central_finetune(base: str, train_files: list[Path], eval_files: dict[str, Path], epochs: float, lr: float,
                     batch_size: int, max_length: int, seed: int) -> dict[str, float]:
    """Held-out loss per eval set (and "all") of the fully fine-tuned model."""
    model, tokenizer = load_base(base)
    pad = tokenizer.pad_token_id
    train = [x for f in train_files for x in lm.encode(tokenizer, read_texts(f), max_length)]
    lm.train(model, train, list(model.parameters()), pad,
             lm.TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, bf16=lm.cpu_has_fast_bf16()),
             desc="central full fine-tune")
    sets = {name: lm.encode(tokenizer, read_texts(f), max_length) for name, f in eval_files.items()}
    out = {"all": losses({"m": model}, [x for enc in sets.values() for x in enc], pad)["m"]}
    out.update({name: losses({"m": model}, enc, pad)["m"] for name, enc in sets.items()})
    return out
