"""Where the demo's quality goes, and what the federated options buy back: one run, same base, data,
emulator and seeds for every row.

    .venv/bin/python bench/quality.py [--rows blocks,schedule-job,prox-0.01,realign-1] [--no-baselines]

Baselines (each trained on the pooled client data for rounds x epochs, as central fine-tuning is):
- central_full_finetune: the whole full model (the upper bound gap_closure is measured against);
- central_adapter_on_full: only the adapter blocks, on the full model itself (what the emulator costs);
- central_offsite: the adapter through the same emulator, then plugged in (what federation costs).
Every row's emulator keeps 2 of the 4 middle blocks, distilled 100 steps; rows whose options change the
adapter build it again with them. Rows: the demo's federated schedule (bench/emulator_strategies.federate:
the system's own trainer, merge and FedAvg, no wire) under each option of the job file. For every row: held-out loss of the plug-in,
gap_closure, exact match on the held-out match results, the emulator's protection margin on general
text (emulator alone minus full model, as the clients end up holding it: re-alignment changes it), a
client's training seconds and upload bytes per round, and the bytes of each re-alignment's patch.
Results: bench/results/quality.json (rows of earlier runs on the same base are kept).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from offsite import lm
from offsite.client.train import LocalTrainer
from offsite.demo.central import full_finetune
from offsite.demo.run import DemoSettings
from offsite.emulator import methods
from offsite.emulator.adapter import extract_adapter
from offsite.emulator.build import build, load_base
from offsite.emulator.bundle import load_bundle
from offsite.emulator.config import EmulatorConfig
from offsite.emulator.evaluate import exact_match
from offsite.emulator.methods import MethodConfig
from offsite.files import write_json
from offsite.tensors import spec_digest, spec_of
from offsite.textdata import read_examples

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from emulator_strategies import demo_inputs, federate, heldout  # noqa: E402  (one setup, one federated schedule)

EMULATOR_DISTILL_STEPS = 100  # every row's emulator: the demo's until 2026-12 (keep 2 of 4 middle blocks, distilled)
ROWS = {  # name -> the job file's options: [training] ones as keyword arguments of federate, [split] train_extra, [adapter] method
    "blocks": {},  # the adapter blocks alone, nothing else changed (the demo's settings until 2026-12)
    "schedule-job": {"lr_schedule": "job"},
    "prox-0.0001": {"prox_mu": 0.0001},  # mu weighs a sum over every trainable: 3.2 M of them here
    "prox-0.001": {"prox_mu": 0.001},
    "prox-0.01": {"prox_mu": 0.01},
    "prox-0.1": {"prox_mu": 0.1},
    "extra-norm": {"train_extra": ("norm",)},
    "extra-norm-head": {"train_extra": ("norm", "head")},  # the demo's base ties them: the embeddings train too
    "realign-1": {"realign_every": 1},  # FedBiOT: the emulator re-aligned around the global adapter after rounds 1 and 2
    "extra-norm-head+realign-1": {"train_extra": ("norm", "head"), "realign_every": 1},
    "lora-16": {"method": {"name": "lora", "r": 16, "alpha": 32.0}},  # LoRA on the adapter blocks' linears
    "lora-16+extra-norm-head": {"method": {"name": "lora", "r": 16, "alpha": 32.0}, "train_extra": ("norm", "head")},  # + LoRA on the tied matrix
    "lora-16+extra-norm-head-lr-0.01": {"method": {"name": "lora", "r": 16, "alpha": 32.0}, "train_extra": ("norm", "head"), "lr": 0.01},
}


def scores(model, tokenizer, held: list, tasks: list) -> dict[str, float]:
    """Held-out loss on the learned tokens and exact match on the task examples."""
    return {"loss": round(lm.mean_token_loss(model, held, tokenizer.pad_token_id), 4),
            "accuracy": round(exact_match(model, tokenizer, tasks), 4)}


def gap_closure(zero_shot: float, top: float, loss: float) -> float:
    """How much of the way from the full model's zero-shot loss to central full fine-tuning's a loss goes."""
    return round((zero_shot - loss) / (zero_shot - top), 4)


def emulator_config(work: Path, train_extra: tuple[str, ...] = ()) -> EmulatorConfig:
    """Every row's emulator: 2 of 4 middle blocks, distilled on the general corpus demo_inputs wrote to `work`."""
    return EmulatorConfig(emulator_layers=2, distill_data=str(work / "data" / "general_train.jsonl"),
                          distill_steps=EMULATOR_DISTILL_STEPS, distill_lr=1e-4, train_extra=train_extra)


def baselines(base: Path, bundle: Path, folders: list[Path], s: DemoSettings, held: list, tasks: list,
              method: MethodConfig = MethodConfig()) -> dict[str, dict]:
    """The three central baselines, each on the pooled data for rounds x epochs, rendered with the bundle's
    tokenizer (a job's chat template included); the adapter ones train `method` on the bundle's adapter
    (its blocks and train_extra), as clients do."""
    pooled = [e for f in folders for e in read_examples(f / "train.jsonl")]
    epochs = s.epochs * s.rounds
    scratch, tokenizer, plan = load_bundle(bundle)
    model, _ = full_finetune(str(base), pooled, epochs, s.central_lr, s.batch_size, s.max_length, s.seed,
                             tokenizer.chat_template, show_progress=False)
    out = {"central_full_finetune": scores(model, tokenizer, held, tasks)}

    cfg = lm.TrainConfig(epochs=epochs, lr=s.lr, batch_size=s.batch_size, seed=s.seed, bf16=lm.cpu_has_fast_bf16())
    full = load_base(str(base))[0]  # the adapter trained on the full model itself
    torch.manual_seed(s.seed)  # a method's fresh modules start as the clients' do
    start = {**extract_adapter(full, plan, on_emulator=False), **methods.fresh_extras(scratch, plan, method)}
    encoded = lm.encode_examples(tokenizer, pooled, s.max_length)
    model, params = methods.attach(methods.apply(full, plan, method, start, on_emulator=False), plan, method,
                                   on_emulator=False, total_steps=lm.total_steps(len(encoded), cfg))
    lm.train(model, encoded, params, tokenizer.pad_token_id, cfg, desc="central adapter on the full model",
             show_progress=False, **methods.training_hooks(model, method))
    out["central_adapter_on_full"] = scores(model, tokenizer, held, tasks)

    result = LocalTrainer(bundle, pooled, None, s.max_length).train_round(  # the adapter through the emulator, plugged in
        start, spec_digest(spec_of(start)), cfg, method, show_progress=False)
    adapter = methods.propose(scratch, plan, method, start, result.update)
    out["central_offsite"] = scores(methods.apply(load_base(str(base))[0], plan, method, adapter, on_emulator=False),
                                    tokenizer, held, tasks)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench"))
    args = parser.parse_args()
    s, work = DemoSettings(), Path(args.work)
    base, folders, general_held, full, tokenizer = demo_inputs(s, work)
    held, tasks = heldout(folders, tokenizer, s.max_length)
    general = lm.encode(tokenizer, general_held, s.max_length)
    zero_shot, full_general = scores(full, tokenizer, held, tasks), lm.mean_token_loss(full, general, tokenizer.pad_token_id)
    out_path = ROOT / "bench" / "results" / "quality.json"
    previous = json.loads(out_path.read_text()) if out_path.is_file() else {}
    bundle = work / "quality-bundle"
    build(str(base), emulator_config(work), bundle, show_progress=False)
    emulator = load_bundle(bundle)[0]
    emulator_zero_shot = scores(emulator, tokenizer, held, tasks)
    margin = round(lm.mean_token_loss(emulator, general, tokenizer.pad_token_id) - full_general, 4)
    t = time.perf_counter()
    central = previous.get("baselines", {}) if args.no_baselines else baselines(base, bundle, folders, s, held, tasks)
    print(f"baselines in {time.perf_counter() - t:.0f} s: {central}", flush=True)
    top = central["central_full_finetune"]["loss"]

    def closure(loss: float) -> float:
        return gap_closure(zero_shot["loss"], top, loss)

    rows = {}
    for name in args.rows.split(","):
        options = dict(ROWS[name])
        extra = options.pop("train_extra", ())
        row_bundle = work / f"quality-bundle-{'-'.join(extra)}" if extra else bundle  # the same emulator, more in the adapter
        if extra:
            build(str(base), emulator_config(work, extra), row_bundle, show_progress=False)
        if "method" in options:
            options["method"] = MethodConfig(**options["method"])
        if options.get("realign_every"):
            options["realign_data"] = work / "data" / "general_train.jsonl"  # the model owner's public text
        fed = federate(base, row_bundle, folders, s, general=general, **options)
        rows[name] = {"options": ROWS[name], "plug_in": round(fed["plug_in"], 4), "gap_closure": closure(fed["plug_in"]),
                      "plug_in_accuracy": round(fed["plug_in_accuracy"], 4),
                      "emulator_with_adapter": round(fed["emulator_with_adapter"], 4),
                      "protection_margin": round(fed["emulator_general_loss"] - full_general, 4),  # as clients end up holding it
                      "patch_bytes_per_realignment": fed["patch_bytes"],
                      "client_seconds_per_round": round(fed["client_seconds_per_round"], 1),
                      "upload_bytes_per_round": fed["upload_bytes"]}
        print(name, rows[name], flush=True)
    print(f"\nfull zero-shot loss {zero_shot['loss']:.3f}, exact match {zero_shot['accuracy']:.1%}; emulator zero-shot "
          f"{emulator_zero_shot['loss']:.3f}, {emulator_zero_shot['accuracy']:.1%}; protection margin {margin:.3f} nats")
    print(f"{'baseline':<26}{'loss':>8}{'gap_closure':>13}{'exact match':>13}")
    for name, b in central.items():
        print(f"{name:<26}{b['loss']:>8.3f}{closure(b['loss']):>13.3f}{b['accuracy']:>13.1%}")
    print(f"{'federated row':<26}{'plug-in':>8}{'gap_closure':>13}{'exact match':>13}{'protection':>12}"
          f"{'client s/round':>16}{'upload B/round':>16}{'patch B':>12}")
    for name, r in rows.items():
        print(f"{name:<26}{r['plug_in']:>8.3f}{r['gap_closure']:>13.3f}{r['plug_in_accuracy']:>13.1%}"
              f"{r['protection_margin']:>12.3f}{r['client_seconds_per_round']:>16.1f}{r['upload_bytes_per_round']:>16,}"
              f"{r.get('patch_bytes_per_realignment', 0):>12,}")
    write_json(out_path, {"machine": f"{os.cpu_count()} cores", "full_zero_shot": zero_shot,
                          "emulator_zero_shot": emulator_zero_shot, "protection_margin": margin, "baselines": central,
                          "rows": {**(previous.get("rows", {}) if previous.get("full_zero_shot") == zero_shot else {}), **rows}})


if __name__ == "__main__":
    main()
