"""Adapter methods side by side on the demo task: trainable parameters, bytes a client uploads per round,
and the plug-in loss after the federated schedule. One run, same emulator, data, schedule and seeds.

    .venv/bin/python bench/adapter_methods.py [--methods full,lora,...,bottleneck] [--rounds 3]

Federation is simulated in one process with the system's own pieces (LocalTrainer, the coordinator's
merge-then-average, plug-in); the wire is left out because it does not change the numbers. Upload bytes
are the safetensors payload; sealing adds 139 bytes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from offsite import lm
from offsite.demo import domain
from offsite.demo.base import prepare_base
from offsite.demo.run import DemoSettings
from offsite.emulator.build import build, load_base
from offsite.emulator.config import EmulatorConfig
from offsite.emulator.methods import MethodConfig
from offsite.files import write_json
from offsite.textdata import read_texts

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from emulator_strategies import federate  # noqa: E402  (one federated schedule for both benches)

LR = {"full": None, "bitfit": 3e-2, "lora": 1e-2, "adalora": 1e-2, "ia3": 3e-2,  # None: the demo's lr
      "prompt": 1e-1, "prefix": 1e-2, "bottleneck": 3e-3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="full,lora,adalora,ia3,bitfit,prompt,prefix,bottleneck")
    parser.add_argument("--rounds", type=int, default=DemoSettings.rounds)
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench"))
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    s = dataclasses.replace(DemoSettings(), rounds=args.rounds)
    work = Path(args.work)
    base = prepare_base(ROOT / "runs" / "demo" / "base", s.base)
    folders = domain.write_clients(work / "data", s.clients, s.n_train, s.n_heldout, s.main_share, s.seed)
    full, tokenizer = load_base(str(base))
    held = [x for f in folders for x in lm.encode(tokenizer, read_texts(f / "heldout.jsonl"), s.max_length)]
    zero_shot = lm.mean_token_loss(full, held, tokenizer.pad_token_id)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = build(str(base), EmulatorConfig(emulator_layers=2), Path(tmp) / "bundle", show_progress=False).bundle_dir
        for name in args.methods.split(","):  # a run of some methods updates only their rows
            t = time.perf_counter()
            fed = federate(base, bundle, folders, s, MethodConfig(name), lr=LR.get(name))
            rows[name] = {"lr": LR.get(name) or s.lr, "trainable_params": fed["trainable_params"],
                          "upload_bytes": fed["upload_bytes"], "emulator_with_adapter": round(fed["emulator_with_adapter"], 4),
                          "plug_in": round(fed["plug_in"], 4), "seconds": round(time.perf_counter() - t)}
            print(name, rows[name], flush=True)
    print(f"\nfull zero-shot {zero_shot:.3f}; {s.rounds} rounds x {s.clients} clients, 1 local epoch; emulator keeps 2 middle blocks")
    print(f"{'method':<9}{'lr':>8}{'trainable':>12}{'upload B':>12}{'emulator+adapter':>18}{'plug-in':>9}{'s':>6}")
    for name, r in rows.items():
        print(f"{name:<9}{r['lr']:>8.0e}{r['trainable_params']:>12,}{r['upload_bytes']:>12,}{r['emulator_with_adapter']:>18.3f}"
              f"{r['plug_in']:>9.3f}{r['seconds']:>6}")
    out = ROOT / "bench" / "results" / "adapter_methods.json"
    kept = json.loads(out.read_text())["methods"] if out.is_file() else {}
    write_json(out, {"full_zero_shot": round(zero_shot, 4), "rounds": s.rounds, "methods": {**kept, **rows}})


if __name__ == "__main__":
    main()
