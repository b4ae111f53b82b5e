"""Next-token loss without the batch's whole logits tensor.

A causal LM's forward returns logits for every position: batch x length x vocabulary values, in fp32 for
the loss, plus as much again for their gradient. At a 152k vocabulary that is 0.6 MB per token, more than
the activations of all the blocks below it. Here the model runs with its LM head replaced by the identity,
so that its output is the last hidden states; only the positions that are scored are kept, and the head
and the cross-entropy run on a slice of them at a time. In training each slice is checkpointed: its
logits are recomputed in backward instead of kept, so at most one slice of logits exists at any time.

That is right only for a model whose logits are its head applied to the last hidden states, with nothing
after (Gemma 2's soft-capping, a logit scale). Each model is probed once, on a few of its first batch's
tokens: where the two ways disagree, or the head is not a linear layer (plain, or with peft's LoRA on it),
the loss is computed from the logits as before.

Freed slices go back to the system only under a fixed malloc threshold (offsite.memory), which
offsite.precision.prepare sets for models with large half-precision weights; it is not set here, because
it slowed the demo model's training steps by 35%. Without it glibc's heap keeps a few freed slices.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE = -100
LOGIT_VALUES_PER_SLICE = 1 << 22   # logits computed at once (16 MiB in fp32): 131 positions at a 32k vocabulary
PROBE_TOKENS = 8

_heads: "weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module | None, bool]]" = weakref.WeakKeyDictionary()


def next_token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of each position's logits against the next token, and how many were scored."""
    logits, target = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, int((target != IGNORE).sum())


def token_loss_sum(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy of `model` over real tokens, and how many tokens were scored.
    Outputs for virtual tokens a model prepends (prompt tuning) are cut off: only the input's are scored."""
    width = ids.shape[1]
    head = _sliceable_head(model, ids, mask)
    if head is None:
        return next_token_loss_sum(model(input_ids=ids, attention_mask=mask).logits[:, -width:], labels)
    with _head_as_identity(head):
        hidden = model(input_ids=ids, attention_mask=mask).logits[:, -width:]
    target = labels[:, 1:]
    scored = target != IGNORE
    rows, wanted = hidden[:, :-1][scored], target[scored]
    if not len(wanted):
        return hidden.sum() * 0.0, 0  # zero, still attached to the graph as a loss must be
    step = max(1, LOGIT_VALUES_PER_SLICE // head.out_features)
    slices = [(rows[lo : lo + step], wanted[lo : lo + step]) for lo in range(0, len(wanted), step)]
    if len(slices) == 1:  # nothing to save: the logits of the scored positions, kept for backward as usual
        return _slice_loss(head, *slices[0]), len(wanted)
    if torch.is_grad_enabled():
        parts = [checkpoint(_slice_loss, head, h, t, use_reentrant=False) for h, t in slices]
    else:
        parts = [_slice_loss(head, h, t) for h, t in slices]
    return torch.stack(parts).sum(), len(wanted)


def _slice_loss(head: nn.Linear, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = type(head).forward(head, hidden)  # the class's forward: the instance's is the identity meanwhile
    return F.cross_entropy(logits.float(), target, reduction="sum")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@contextlib.contextmanager
def _head_forward(head: nn.Module, forward):
    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def _head_as_identity(head: nn.Module):
    return _head_forward(head, _identity)


def _sliceable_head(model, ids: torch.Tensor, mask: torch.Tensor) -> nn.Linear | None:
    """`model`'s LM head if its logits are that head on the last hidden states and nothing else; else None.
    Probed once per model and head (see the module doc), in eval mode and without touching the random
    state: the head on the hidden states must give the logits (no scale or shift after it), and logits a
    thousand times larger must come out a thousand times larger (no soft-capping, which small logits hide)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    known = _heads.get(model)
    if known is not None and known[0] is head:
        return head if known[1] else None
    plain = _linear(head) and "forward" not in vars(head) and not getattr(model, "hf_device_map", None)
    ok = plain and _probe(model, head, ids[:1, :PROBE_TOKENS], mask[:1, :PROBE_TOKENS])
    _heads[model] = (head, ok)
    return head if ok else None


def _linear(head: nn.Module | None) -> bool:
    """A linear layer, or peft's LoRA on one (the adapter trains the head): either maps rows to rows."""
    return isinstance(head, nn.Linear) or (hasattr(head, "get_base_layer") and isinstance(head.get_base_layer(), nn.Linear))


def _probe(model, head: nn.Linear, ids: torch.Tensor, mask: torch.Tensor) -> bool:
    run = lambda: model(input_ids=ids, attention_mask=mask).logits.float()  # noqa: E731
    linear = lambda x: type(head).forward(head, x)  # noqa: E731
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            want = run()
            with _head_as_identity(head):
                got = linear(model(input_ids=ids, attention_mask=mask).logits).float()
            with _head_forward(head, lambda x: linear(x) * 1000.0):
                scaled = run()
    finally:
        for m, training in modes:
            m.training = training
    close = lambda a, b: a.shape == b.shape and bool((a - b).abs().max() <= 1e-4 * max(1.0, float(b.abs().max())))  # noqa: E731
    return close(got, want) and close(scaled, want * 1000.0)
