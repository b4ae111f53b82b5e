"""`offsite emulator build ...`: the same build the coordinator runs, as a command."""
from __future__ import annotations

import argparse

from offsite.emulator.build import build


def cmd_build(args) -> int:
    result = build(args.model, args.bottom, args.top, args.emulator_layers, args.out)
    print(f"emulator bundle in {result.bundle_dir}: blocks {list(result.plan.emulator_order)} of {result.plan.num_blocks}; "
          f"params full {result.full_params:,}, emulator {result.emulator_params:,}, adapter {result.adapter_params:,}")
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="build an emulator bundle (uniform layer drop)")
    p.add_argument("--model", required=True, help="local folder or hub id of a causal LM")
    p.add_argument("--bottom", type=int, default=2)
    p.add_argument("--top", type=int, default=2)
    p.add_argument("--emulator-layers", type=int, required=True, help="middle blocks the emulator keeps")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_build)
