"""Beyond uniform drop: choose the kept middle blocks by representation similarity (CRaSh, EMNLP 2023)
and compress the kept blocks' attention by truncated SVD (ScaleOT, 2024).

Similarity: run calibration text through the full model, take each middle block's output, measure
linear CKA between every pair of middle blocks, split the middle into `keep` contiguous clusters that
maximise within-cluster similarity (dynamic programming), and keep from each cluster the block most
similar to the rest of it. Blocks that barely change the representation cluster together, so dropping
all but one of them loses little.
"""
from __future__ import annotations

import torch
from torch import nn

from offsite import lm
from offsite.emulator.blocks import attention_module, find_blocks
from offsite.emulator.plan import SplitPlan
from offsite.errors import ConfigError


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear centered kernel alignment of two (tokens x features) representations, in [0, 1]."""
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    cross = (y.T @ x).norm() ** 2
    return float(cross / ((x.T @ x).norm() * (y.T @ y).norm()).clamp_min(1e-12))


@torch.no_grad()
def middle_similarity(model, plan_bottom: int, plan_top: int, windows: list[list[int]], pad_id: int,
                      max_tokens: int = 4096) -> torch.Tensor:
    """CKA matrix between the outputs of the middle blocks (indices bottom..n-top-1) on calibration text."""
    n = model.config.num_hidden_layers
    model.eval()
    outputs: list[list[torch.Tensor]] = [[] for _ in range(plan_bottom, n - plan_top)]
    seen = 0
    for ids, mask, _ in lm.batches(windows, 8, pad_id):
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        keep = mask.bool()
        for j, block in enumerate(range(plan_bottom, n - plan_top)):
            outputs[j].append(hidden[block + 1][keep].float())
        seen += int(keep.sum())
        if seen >= max_tokens:
            break
    reps = [torch.cat(o)[:max_tokens] for o in outputs]
    m = len(reps)
    sim = torch.ones(m, m)
    for i in range(m):
        for j in range(i + 1, m):
            sim[i, j] = sim[j, i] = linear_cka(reps[i], reps[j])
    return sim


def contiguous_clusters(sim: torch.Tensor, k: int) -> list[list[int]]:
    """Split 0..m-1 into k contiguous runs maximising the summed mean within-run similarity."""
    m = sim.shape[0]
    if not 1 <= k <= m:
        raise ConfigError(f"cannot form {k} clusters from {m} middle blocks")

    def score(a: int, b: int) -> float:  # run a..b-1
        block = sim[a:b, a:b]
        return float(block.mean())

    best = [[float("-inf")] * (m + 1) for _ in range(k + 1)]
    cut = [[0] * (m + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for c in range(1, k + 1):
        for end in range(c, m + 1):
            for start in range(c - 1, end):
                value = best[c - 1][start] + score(start, end)
                if value > best[c][end]:
                    best[c][end], cut[c][end] = value, start
    runs, end = [], m
    for c in range(k, 0, -1):
        start = cut[c][end]
        runs.append(list(range(start, end)))
        end = start
    return runs[::-1]


def similarity_plan(num_blocks: int, bottom: int, top: int, keep: int, sim: torch.Tensor,
                    share: bool = False) -> SplitPlan:
    """Keep one representative (most similar to its cluster) per contiguous cluster of middle blocks;
    `share`: each representative runs once for every block of its cluster (CRaSh's layer sharing)."""
    runs = contiguous_clusters(sim, keep)
    picks = [max(run, key=lambda i: float(sim[i, run].sum())) for run in runs]
    return SplitPlan(num_blocks, bottom, top, tuple(bottom + p for p in picks),
                     repeats=tuple(len(run) for run in runs) if share else ())


@torch.no_grad()
def low_rank_attention(model, plan: SplitPlan, rank: int) -> int:
    """Replace every attention projection of the kept middle blocks by its best rank-`rank` approximation.

    Weights stay dense, so the bundle remains a standard model folder. Returns how many matrices changed.
    """
    if rank < 1:
        raise ConfigError(f"attn_rank must be at least 1, got {rank}")
    blocks = find_blocks(model).blocks
    changed = 0
    for position in range(plan.bottom, plan.bottom + len(plan.kept_middle)):
        for module in attention_module(blocks[position]).modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter) and weight.dim() == 2 and min(weight.shape) > rank:
                u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
                weight.copy_(((u[:, :rank] * s[:rank]) @ vh[:rank]).to(weight.dtype))
                changed += 1
    return changed
