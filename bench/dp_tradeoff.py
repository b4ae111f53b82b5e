"""DP-FedAvg on the demo task: epsilon spent against plug-in loss, by noise multiplier. One run, same
emulator, data, schedule and seeds as the demo (3 rounds x 3 clients, full adapter blocks), the
coordinator's own clipped, noised mean.

    .venv/bin/python bench/dp_tradeoff.py [--clip 1.0] [--noise 0,0.001,0.01,0.1]

With 3 clients the noise on the mean has standard deviation z*C/3 per value over 3.2 M values, so only
tiny z leave a usable model, and their epsilon is far beyond any meaningful guarantee: DP-FedAvg
needs thousands of clients per round (McMahan et al. 2018 used 5,000+). The table shows that cost.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from offsite import lm
from offsite.cloud.privacy import DPConfig, epsilon
from offsite.demo import domain
from offsite.demo.base import prepare_base
from offsite.demo.run import DemoSettings
from offsite.emulator.build import build, load_base
from offsite.emulator.config import EmulatorConfig
from offsite.files import write_json
from offsite.textdata import read_texts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from emulator_strategies import federate  # noqa: E402  (the demo's federated schedule)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--noise", default="0,0.001,0.01,0.1")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench"))
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    s = DemoSettings()
    base = prepare_base(ROOT / "runs" / "demo" / "base", s.base)
    folders = domain.write_clients(Path(args.work) / "data", s.clients, s.n_train, s.n_heldout, s.main_share, s.seed)
    full, tokenizer = load_base(str(base))
    held = [x for f in folders for x in lm.encode(tokenizer, read_texts(f / "heldout.jsonl"), s.max_length)]
    zero_shot = lm.mean_token_loss(full, held, tokenizer.pad_token_id)
    bundle = build(str(base), EmulatorConfig(emulator_layers=2), Path(args.work) / "dp-bundle", show_progress=False).bundle_dir
    rows = {}
    plain = federate(base, bundle, folders, s)
    rows["no DP"] = {"epsilon": None, "plug_in": round(plain["plug_in"], 4)}
    print(f"no DP: plug-in {plain['plug_in']:.3f}", flush=True)
    for z in map(float, args.noise.split(",")):
        dp = DPConfig(clip=args.clip, noise=z, delta=args.delta)
        fed = federate(base, bundle, folders, s, dp=dp)
        eps = epsilon(dp, s.rounds)
        rows[f"z={z:g}"] = {"noise_multiplier": z, "epsilon": None if eps == float("inf") else round(eps, 1),
                            "plug_in": round(fed["plug_in"], 4)}
        print(f"z={z:g}: epsilon {eps:.3g} at delta {args.delta:g}, plug-in {fed['plug_in']:.3f}", flush=True)
    print(f"\nfull zero-shot {zero_shot:.3f}; clip C = {args.clip:g}; {s.rounds} rounds x {s.clients} clients")
    print(f"{'setting':<12}{'epsilon':>12}{'plug-in':>9}")
    for name, r in rows.items():
        print(f"{name:<12}{'inf' if r['epsilon'] is None else r['epsilon']:>12}{r['plug_in']:>9.3f}")
    write_json(ROOT / "bench" / "results" / "dp_tradeoff.json",
               {"full_zero_shot": round(zero_shot, 4), "clip": args.clip, "delta": args.delta, "rounds": s.rounds, "rows": rows})


if __name__ == "__main__":
    main()
