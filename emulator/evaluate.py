"""Held-out evaluation: the same examples through several models (loss, perplexity), and exact match of greedy
decoding on prompts whose completion is determined."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from offsite import lm, render
from offsite.emulator.build import load_base
from offsite.emulator.bundle import load_bundle, read_manifest
from offsite.textdata import Example, read_texts


def losses(models: dict, encoded: list[list[int]], pad_id: int) -> dict[str, float]:
    """Mean token loss of each named model on the same encoded examples."""
    return {name: round(lm.mean_token_loss(m, encoded, pad_id), 4) for name, m in models.items()}


SHORT_ANSWER_TOKENS = 16  # a completion this short is taken as the single answer its prompt determines


def answerable(tokenizer, examples: list[Example]) -> list[Example]:
    """The examples exact match can score: a prompt (or a chat before its last assistant turn) whose
    completion is a short answer (at most SHORT_ANSWER_TOKENS tokens), not a text to continue."""
    return [e for e in examples if (e.prompt or e.messages)
            and len(tokenizer(e.completion, add_special_tokens=False)["input_ids"]) <= SHORT_ANSWER_TOKENS]


@torch.no_grad()
def exact_match(model, tokenizer, examples: list[Example], batch_size: int = 32) -> float:
    """Share of `examples` whose completion greedy decoding after the prompt reproduces exactly (the decoded
    continuation begins with it): a task metric for prompts whose answer is determined, e.g. a match result
    that follows from the score. Generates as many tokens as the completion has, plus one."""
    if not examples:
        return float("nan")
    device, pad = lm.input_device(model), render.pad_id(tokenizer)
    was_training = model.training
    model.eval()
    right = 0
    try:
        for i in range(0, len(examples), batch_size):
            batch = examples[i:i + batch_size]
            prompts = [render.served_prompt(tokenizer, e) for e in batch]  # as the server would be sent them
            steps = max(len(ids) for ids in tokenizer([e.completion for e in batch], add_special_tokens=False)["input_ids"]) + 1
            width = max(map(len, prompts))  # left-padded, so that every row's next token comes at the same place
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            for e, row in zip(batch, out[:, width:].tolist()):
                right += tokenizer.decode(row, skip_special_tokens=True).startswith(e.completion)
    finally:
        model.train(was_training)
    return right / len(examples)


def count_params(model) -> int:
    """Parameters as the model defines them; a packed 4-bit weight knows its real shape."""
    total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += math.prod(shape) if shape is not None else p.numel()
    return total


def compare_full_and_emulator(model: str, emulator_dir: str | Path, data: str | Path, max_length: int = 512) -> dict:
    """Loss, perplexity, parameters and bytes of the full model and of the emulator alone.
    Under `accelerate launch` each process scores its share of the examples on its own device."""
    state = lm.launched_state()
    device = "cpu" if state is None or state.device.type == "cpu" else str(state.device)
    full, tokenizer = load_base(model)
    emulator, _, plan = load_bundle(emulator_dir, device)
    encoded = lm.encode(tokenizer, read_texts(data), max_length)
    manifest = read_manifest(emulator_dir)
    out = {}
    for name, m in (("full", full.to(device)), ("emulator", emulator)):
        loss = lm.mean_token_loss(m, encoded, render.pad_id(tokenizer), state=state)
        out[name] = {"loss": round(loss, 4), "ppl": round(math.exp(loss), 3), "params": count_params(m),
                     "bytes": sum(p.numel() * p.element_size() for p in m.parameters())}
    out["emulator"]["bundle_bytes"] = sum(f["size"] for f in manifest["files"].values())
    out["plan"] = plan.to_dict()
    out["examples"] = len(encoded)
    return out
