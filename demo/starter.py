"""`python -m offsite.demo.starter DIR`: stand-ins for what a first job needs, laid out the way
`docs/job.example.toml` names it, so the README's walkthrough runs as written before anyone brings their own:

    DIR/models/my-base/        a small LLaMA-style base (random weights, its own tokenizer): the model owner's
    DIR/data/alice.jsonl       two data owners' training files (weather, match and train-departure bulletins,
    DIR/data/bob.jsonl         each owner mostly one kind: non-IID as real owners are)
    DIR/data/validation.jsonl  the model owner's held-out set for the final evaluation

Swap in a real base folder (or hub id) and real files, keeping the names, and the same commands train it."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from offsite.demo import domain
from offsite.demo.tiny import make_tiny_model

OWNERS = ("alice", "bob")
TRAIN_EXAMPLES = 300      # per data owner: the example job's recipe is for ~100-1000 examples each
VALIDATION_EXAMPLES = 100
BASE_LAYERS = 16          # bottom 2 + top 2 adapter blocks; the example job's emulator keeps 8 of the 12 between


def write_starter(out: Path) -> dict[str, Path]:
    """The base and the files; returns what was written, by role."""
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty: give a new folder")
    written = {"base": make_tiny_model(out / "models" / "my-base", num_layers=BASE_LAYERS, hidden_size=64)}
    for i, owner in enumerate(OWNERS):
        records = domain.make_client_records(i, len(OWNERS), TRAIN_EXAMPLES, 0.8, seed=7)
        domain.write_jsonl(out / "data" / f"{owner}.jsonl", records)
        written[owner] = out / "data" / f"{owner}.jsonl"
    validation = [r for i in range(len(OWNERS)) for r in
                  domain.make_client_records(i, len(OWNERS), VALIDATION_EXAMPLES // len(OWNERS), 0.8, seed=8)]
    domain.write_jsonl(out / "data" / "validation.jsonl", validation)
    written["validation"] = out / "data" / "validation.jsonl"
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m offsite.demo.starter", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a new folder")
    args = parser.parse_args(argv)
    for role, path in write_starter(args.out).items():
        print(f"{role}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
