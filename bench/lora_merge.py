"""A LoRA round's aggregation: one peft merge per update (how rounds closed before) against one merge per
batch of stacked updates (offsite.emulator.methods.propose_mean, what the round worker does now), side by
side in one run on the same updates, with the largest difference between the two means.

    .venv/bin/python bench/lora_merge.py [--updates 50 --hidden 512 --layers 8 --r 8 --batch 32]

The model is a LLaMA-style config with random weights (nothing downloaded); the adapter is its bottom 2 and
top 2 blocks, LoRA on every linear layer. The updates are random factors of the job's shapes, as trained
ones would be.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from offsite.cloud.aggregate import WeightedMean
from offsite.emulator import methods
from offsite.emulator.adapter import extract_adapter
from offsite.emulator.build import make_emulator
from offsite.emulator.methods import MethodConfig
from offsite.emulator.plan import SplitPlan

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora_merge.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=1000, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                  num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8)
    plan = SplitPlan.uniform(args.layers, 2, 2, 1)
    scratch = make_emulator(AutoModelForCausalLM.from_config(copy.deepcopy(config)), plan)  # cutting edits the config
    cfg = MethodConfig("lora", r=args.r)
    start = extract_adapter(scratch, plan, on_emulator=True)
    trained, _ = methods.attach(make_emulator(AutoModelForCausalLM.from_config(copy.deepcopy(config)), plan), plan, cfg)
    shapes = {k: v.shape for k, v in methods.trainable_state(trained, plan, cfg).items()}
    updates = [{k: 0.02 * torch.randn(s) for k, s in shapes.items()} for _ in range(args.updates)]
    weights = [float(10 + i % 7) for i in range(args.updates)]

    t = time.perf_counter()
    one_by_one = WeightedMean()
    for update, weight in zip(updates, weights):
        one_by_one.add(methods.propose(scratch, plan, cfg, start, update, copy=False), weight)
    each = time.perf_counter() - t
    want = one_by_one.result()

    t = time.perf_counter()
    batched = WeightedMean()
    for i in range(0, args.updates, args.batch):
        batched.add(methods.propose_mean(scratch, plan, cfg, start, updates[i:i + args.batch], weights[i:i + args.batch]),
                    sum(weights[i:i + args.batch]))
    stacked = time.perf_counter() - t
    got = batched.result()

    result = {"updates": args.updates, "hidden": args.hidden, "layers": args.layers, "r": args.r, "batch": args.batch,
              "update_bytes": sum(v.numel() * 4 for v in updates[0].values()),
              "one_merge_per_update_s": round(each, 3), "one_merge_per_batch_s": round(stacked, 3),
              "speedup": round(each / stacked, 1),
              "max_abs_difference": max((got[k] - want[k]).abs().max().item() for k in want)}
    print(json.dumps(result, indent=2))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
