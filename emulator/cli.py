"""`offsite emulator build|eval`: the same code the coordinator runs, as commands."""
from __future__ import annotations

import argparse
import json

from offsite.emulator.config import STRATEGIES, EmulatorConfig


def cmd_build(args) -> int:
    from offsite.emulator.build import build  # torch and transformers: only when building

    cfg = EmulatorConfig(bottom=args.bottom, top=args.top, emulator_layers=args.emulator_layers,
                         strategy=args.strategy, quantize=args.quantize, attn_rank=args.attn_rank, calibration_data=args.calibration_data,
                         distill_data=args.distill_data, distill_steps=args.distill_steps, distill_lr=args.distill_lr,
                         share_blocks=args.share_blocks)
    result = build(args.model, cfg, args.out)
    if not _reports():
        return 0
    print(f"emulator bundle in {result.bundle_dir}: blocks {list(result.plan.emulator_order)} of {result.plan.num_blocks}; "
          f"params full {result.full_params:,}, emulator {result.emulator_params:,}, adapter {result.adapter_params:,}")
    return 0


def cmd_eval(args) -> int:
    from offsite.emulator.evaluate import compare_full_and_emulator

    out = compare_full_and_emulator(args.model, args.emulator, args.data, args.max_length)
    if not _reports():
        return 0
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'':<10}{'loss':>9}{'ppl':>11}{'params':>14}{'bytes':>15}")
    for name in ("full", "emulator"):
        r = out[name]
        print(f"{name:<10}{r['loss']:>9.4f}{r['ppl']:>11.3f}{r['params']:>14,}{r['bytes']:>15,}")
    print(f"emulator bundle on disk: {out['emulator']['bundle_bytes']:,} bytes; {out['examples']} held-out examples")
    return 0


def cmd_support(args) -> int:
    from offsite.emulator import support

    if args.model:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(args.model).eval()
        models = {model.config.model_type: model}
    else:
        models = {family: support.tiny(family) for family in support.FAMILIES}
    table = support.matrix(models)
    if args.markdown:
        print(support.markdown(table), end="")
        return 0
    for name, row in table.items():
        print(f"{name}: " + ", ".join(m if why is None else f"{m} NO ({why})" for m, why in row.items()))
    return 0


def _reports() -> bool:
    """Under `accelerate launch` every process runs the command; only the main one prints the result."""
    from offsite import lm

    state = lm.launched_state()
    return state is None or state.is_main_process


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="build an emulator bundle (layer drop, optional low-rank attention and distillation)")
    p.add_argument("--model", required=True, help="local folder or hub id of a causal LM")
    p.add_argument("--bottom", type=int, default=2)
    p.add_argument("--top", type=int, default=2)
    p.add_argument("--emulator-layers", type=int, required=True, help="middle blocks the emulator keeps")
    p.add_argument("--out", required=True)
    p.add_argument("--strategy", choices=STRATEGIES, default="uniform",
                   help="uniform layer drop, or one block per cluster of similar middle blocks (CRaSh)")
    p.add_argument("--quantize", choices=("int8", "nf4"), help="store the middle blocks quantized (bitsandbytes)")
    p.add_argument("--calibration-data", help="text to measure block similarity on (default: --distill-data)")
    p.add_argument("--attn-rank", type=int, default=0, help="rank of the SVD approximation of kept attention weights (0: off)")
    p.add_argument("--share-blocks", action="store_true",
                   help="each kept middle block also runs for the dropped blocks it stands for: the full depth (CRaSh)")
    p.add_argument("--distill-data", help="text to distill the emulator on (JSONL 'text' or .txt)")
    p.add_argument("--distill-steps", type=int, default=0, help="distillation steps (0: none); resumes from checkpoints")
    p.add_argument("--distill-lr", type=float, default=1e-4)
    p.set_defaults(func=cmd_build)
    p = sub.add_parser("eval", help="held-out loss and perplexity of the full model and the emulator alone")
    p.add_argument("--model", required=True, help="local folder or hub id of the full model")
    p.add_argument("--emulator", required=True, help="emulator bundle folder")
    p.add_argument("--data", required=True, help="JSONL with a 'text' field")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("support", help="which adapter methods run on a model (default: every family's tiny stand-in), "
                                       "found by running each one as `jobs create` does")
    p.add_argument("--model", help="local folder or hub id of a causal LM (default: the tiny stand-in of every family)")
    p.add_argument("--markdown", action="store_true", help="a Markdown table (the README's is made so)")
    p.set_defaults(func=cmd_support)
