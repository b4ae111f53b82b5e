"""`python -m offsite.demo`: the whole system end to end on the embedded default (see README)."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from transformers.utils import logging as hf_logging

from offsite.demo.base import BaseConfig
from offsite.demo.run import DemoSettings, prepare, run_demo
from offsite.demo.walkthrough import run_walkthrough


def _noises(text: str) -> list[float]:
    levels = [float(z) for z in text.split(",") if z.strip()]
    if not levels or any(z <= 0 for z in levels):
        raise argparse.ArgumentTypeError(f"noise multipliers must be positive, got {text!r}")
    return levels


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m offsite.demo", description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="run folder (the base model is cached in it)")
    parser.add_argument("--rounds", type=int, default=DemoSettings.rounds)
    parser.add_argument("--records", type=int, default=DemoSettings.n_train, help="training records per client")
    parser.add_argument("--epochs", type=float, default=DemoSettings.epochs, help="local epochs per round")
    parser.add_argument("--base-steps", type=int, default=BaseConfig.steps,
                        help="pretraining steps of the base model (fewer: the middle blocks matter less, see README)")
    parser.add_argument("--distill-steps", type=int, default=DemoSettings.distill_steps,
                        help="emulator distillation steps on the general corpus (0: plain uniform drop)")
    parser.add_argument("--secure-aggregation", action="store_true",
                        help="mask each client's change so the coordinator learns only the sum (Bonawitz et al. 2017)")
    parser.add_argument("--dp-noise", type=float, default=0.0, help="DP-FedAvg noise multiplier z (0: no DP)")
    parser.add_argument("--dp-clip", type=float, default=DemoSettings.dp_clip, help="DP-FedAvg clip bound C")
    parser.add_argument("--dp-sweep", type=_noises, default=[], metavar="Z1,Z2,...",
                        help="after the run, the same job again under DP-FedAvg at each noise multiplier (> 0); "
                             "the report gains epsilon and plug-in loss per level (each level costs one more job)")
    parser.add_argument("--no-walkthrough", action="store_true",
                        help="skip running the README's walkthrough after the demo (it needs the repository's docs/ and .venv/)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="only write the base model, the data and OUT/job.toml (what deploy/compose.yaml starts from)")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    settings = DemoSettings(rounds=args.rounds, n_train=args.records, epochs=args.epochs, distill_steps=args.distill_steps,
                            secure_aggregation=args.secure_aggregation, dp_noise=args.dp_noise, dp_clip=args.dp_clip,
                            base=replace(BaseConfig(), steps=args.base_steps))
    if args.prepare_only:
        prepare(Path(args.out).resolve(), settings)
        print(f"demo inputs ready in {args.out} ({time.perf_counter() - started:.0f} s); job: {Path(args.out) / 'job.toml'}")
        return 0
    ok = run_demo(Path(args.out), settings, args.dp_sweep)
    if not args.no_walkthrough:  # the README's walkthrough, exactly as written, so that it cannot go stale
        walked = run_walkthrough(Path(args.out).resolve() / "walkthrough")
        print(f"README walkthrough: {walked.get('status', '')} in {walked['seconds']:.0f} s; validation loss "
              f"{walked.get('validation')}; curl got {walked.get('completion_tokens', 0)} tokens")
        for problem in walked["problems"]:
            print(f"CHECK FAILED: {problem}")
        ok = ok and not walked["problems"]
    print(f"demo finished in {time.perf_counter() - started:.0f} s: {'all checks passed' if ok else 'CHECKS FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
