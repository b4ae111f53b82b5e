"""Emulator variants side by side on the demo model: what each gives the data owner (plug-in
gap_closure and exact match after the demo's federated schedule) and the model owner (protection: the
emulator alone's loss on general text minus the full model's, and its exact match on the task; a worse
emulator protects more). One run, same data, same schedule, same seeds for every variant; the strategies
and the knobs that move them (distillation steps, attention rank, kept blocks, CRaSh's sharing of the kept
blocks over the full depth). The utility/protection
frontier is drawn to bench/results/frontier.svg.

    .venv/bin/python bench/emulator_strategies.py [--variants uniform,distill,...] [--distill-steps 200]

Federation is simulated in one process with the system's own pieces (LocalTrainer, FedAvg, plug-in);
the wire is left out because it does not change the numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from offsite import lm
from offsite.client.run import schedule_part
from offsite.client.train import LocalTrainer
from offsite.cloud.aggregate import FedAvg, WeightedMean
from offsite.demo import domain
from offsite.demo.base import prepare_base
from offsite.demo.central import central_finetune
from offsite.demo.corpus import general_corpus
from offsite.demo.run import DemoSettings
from offsite.emulator.adapter import extract_adapter
from offsite.emulator.blocks import find_blocks
from offsite.emulator.build import build, load_base
from offsite.emulator.bundle import load_bundle
from offsite.emulator import methods
from offsite.emulator.config import EmulatorConfig
from offsite.emulator.evaluate import answerable, exact_match
from offsite.emulator.methods import MethodConfig
from offsite.emulator.distill import DistillConfig
from offsite.emulator.quantize import tensor_bytes_by_block
from offsite.emulator.realign import apply_patch, realign_bundle
from offsite.files import write_json
from offsite.tensors import spec_digest, spec_of, to_bytes
from offsite.textdata import Example, read_examples, read_tasks, read_texts

ROOT = Path(__file__).resolve().parents[1]


def variants(distill_data: Path, steps: int) -> dict[str, EmulatorConfig]:
    def distilled(n: int) -> EmulatorConfig:
        return EmulatorConfig(emulator_layers=2, distill_data=str(distill_data), distill_steps=n, distill_lr=1e-4)
    return {
        "uniform": EmulatorConfig(emulator_layers=2),
        "distill": distilled(steps),
        "distill-50": distilled(50),
        "distill-100": distilled(100),
        "keep-1": EmulatorConfig(emulator_layers=1),
        "keep-3": EmulatorConfig(emulator_layers=3),
        "share-1": EmulatorConfig(emulator_layers=1, share_blocks=True),  # CRaSh: the kept block runs 4 times
        "share-2": EmulatorConfig(emulator_layers=2, share_blocks=True),  # each kept block twice
        "attn-rank-32": EmulatorConfig(emulator_layers=2, attn_rank=32),
        "similarity": EmulatorConfig(emulator_layers=2, strategy="similarity", calibration_data=str(distill_data)),
        "attn-rank": EmulatorConfig(emulator_layers=2, attn_rank=64),
        "int8": EmulatorConfig(emulator_layers=2, quantize="int8"),
        "nf4": EmulatorConfig(emulator_layers=2, quantize="nf4"),
        "sim+distill": EmulatorConfig(emulator_layers=2, strategy="similarity", distill_data=str(distill_data),
                                      distill_steps=steps, distill_lr=1e-4),
    }


def heldout(folders: list[Path], tokenizer, max_length: int) -> tuple[list[lm.Row], list[Example]]:
    """Every client's heldout.jsonl rendered as training renders it (text, prompt/completion or chat: the loss
    counts the learned tokens only), and what exact match scores: a folder's heldout_task.jsonl (the demo's
    match results cut out of its text bulletins), else its held-out examples' own short answers (chats)."""
    held, tasks = [], []
    for f in folders:
        examples = read_examples(f / "heldout.jsonl")
        held += lm.encode_examples(tokenizer, examples, max_length)
        tasks += read_tasks(f / "heldout_task.jsonl") if (f / "heldout_task.jsonl").is_file() else answerable(tokenizer, examples)
    return held, tasks


def federate(base: Path, bundle: Path, folders: list[Path], s: DemoSettings, method: MethodConfig = MethodConfig(),
             lr: float | None = None, prox_mu: float = 0.0, lr_schedule: str = "round", realign_every: int = 0,
             realign_steps: int = 50, realign_data: Path | None = None, general: list | None = None) -> dict[str, float]:
    """The demo's schedule: rounds x clients, each from the global adapter; each update merged into the
    dense adapter it proposes and averaged by examples, as the coordinator does; with `realign_every`, the
    emulator re-aligned around the new global adapter every k rounds on `realign_data` (FedBiOT), as the
    coordinator does. Clients hold any data format and render it with the bundle's tokenizer (which carries a
    job's chat template), as the held-out data is scored. Returns the held-out loss and exact match (see
    `heldout`) of the emulator with the adapter and of the plug-in, and what a client spent: trainable
    parameters, upload bytes, seconds of training per round, and patch bytes per re-alignment; with `general`
    (encoded general text), the loss of the emulator alone on it as the clients end up holding it."""
    trainers = [LocalTrainer(bundle, read_examples(f / "train.jsonl"), None, s.max_length) for f in folders]
    full, tokenizer, plan = load_base(str(base))[0], trainers[0].tokenizer, trainers[0].plan
    scratch = load_bundle(bundle)[0]
    torch.manual_seed(s.seed)
    global_adapter = {**extract_adapter(full, plan, on_emulator=False), **methods.fresh_extras(scratch, plan, method)}
    digest = spec_digest(spec_of(global_adapter))
    seconds, patch, patch_bytes = 0.0, None, 0
    for r in range(s.rounds):
        mean = WeightedMean()
        for t in trainers:
            cfg = lm.TrainConfig(epochs=s.epochs, lr=lr or s.lr, batch_size=s.batch_size, seed=s.seed + 1000 * r,
                                 bf16=lm.cpu_has_fast_bf16(), prox_mu=prox_mu, schedule=schedule_part(lr_schedule, r, s.rounds))
            out = t.train_round(global_adapter, digest, cfg, method, show_progress=False, emulator_patch=patch)
            seconds += out.stats.seconds
            mean.add(methods.propose(scratch, plan, method, global_adapter, out.update), float(len(t.train_set)))
        global_adapter, _ = FedAvg().step(global_adapter, mean.result(), {})
        if realign_every and (r + 1) % realign_every == 0 and r + 1 < s.rounds:
            dcfg = DistillConfig(steps=realign_steps, lr=1e-4, seed=s.seed + r + 1, bf16=lm.cpu_has_fast_bf16())
            patch = realign_bundle(str(base), bundle, patch, method, global_adapter, read_texts(realign_data), dcfg)
            patch_bytes = len(to_bytes(patch))
    held, tasks = heldout(folders, tokenizer, s.max_length)
    emulator, _, plan = load_bundle(bundle)
    if patch is not None:
        apply_patch(emulator, plan, patch)
    alone = lm.mean_token_loss(emulator, general, tokenizer.pad_token_id) if general else None
    emulator = methods.apply(emulator, plan, method, global_adapter)
    full = methods.apply(full, plan, method, global_adapter, on_emulator=False)
    return {"emulator_with_adapter": lm.mean_token_loss(emulator, held, tokenizer.pad_token_id),
            "plug_in": lm.mean_token_loss(full, held, tokenizer.pad_token_id),
            "emulator_with_adapter_accuracy": exact_match(emulator, tokenizer, tasks),
            "plug_in_accuracy": exact_match(full, tokenizer, tasks),
            "trainable_params": out.trainable_params, "upload_bytes": len(to_bytes(out.update)),
            "client_seconds_per_round": seconds / (s.rounds * len(trainers)), "patch_bytes": patch_bytes,
            **({"emulator_general_loss": alone} if general else {})}


def demo_inputs(s: DemoSettings, work: Path):
    """What the demo's benches start from, seeded: the demo's base (cached), each client's data and the
    general corpus under `work`; returns (base folder, client folders, general held-out texts, full model,
    tokenizer)."""
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    base = prepare_base(ROOT / "runs" / "demo" / "base", s.base)
    folders = domain.write_clients(work / "data", s.clients, s.n_train, s.n_heldout, s.main_share, s.seed)
    general_train, general_held = general_corpus()
    domain.write_jsonl(work / "data" / "general_train.jsonl", general_train)
    full, tokenizer = load_base(str(base))
    return base, folders, general_held, full, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="uniform,distill")
    parser.add_argument("--distill-steps", type=int, default=200)
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench"))
    parser.add_argument("--train-extra", default="norm", help="what every variant's adapter trains beyond its blocks "
                        "(comma-separated: norm, head, embeddings; '' for the blocks alone): the demo trains the norm")
    args = parser.parse_args()
    s, work = DemoSettings(), Path(args.work)
    base, folders, general_held, full, tokenizer = demo_inputs(s, work)
    general = lm.encode(tokenizer, general_held, s.max_length)
    held, tasks = heldout(folders, tokenizer, s.max_length)
    zero_shot = lm.mean_token_loss(full, held, tokenizer.pad_token_id)
    zero_shot_accuracy = exact_match(full, tokenizer, tasks)
    full_general = lm.mean_token_loss(full, general, tokenizer.pad_token_id)
    cached = work / "central.json"  # the baseline does not depend on the emulator: compute it once
    key = {"settings": repr(s), "base": (base / "offsite-base.json").read_text()}
    if cached.is_file() and json.loads(cached.read_text())["key"] == key:
        central = json.loads(cached.read_text())["all"]
    else:
        central = central_finetune(str(base), [f / "train.jsonl" for f in folders], {f.name: f / "heldout.jsonl" for f in folders},
                                   s.epochs * s.rounds, s.central_lr, s.batch_size, s.max_length, s.seed).loss["all"]
        write_json(cached, {"key": key, "all": central})
    print(f"full zero-shot {zero_shot:.3f}, central fine-tune {central:.3f}; "
          f"full model on general text {full_general:.3f}")
    rows = {}
    for name in args.variants.split(","):
        cfg = dataclasses.replace(variants(work / "data" / "general_train.jsonl", args.distill_steps)[name],
                                  train_extra=tuple(x for x in args.train_extra.split(",") if x))
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            build(str(base), cfg, Path(tmp) / "bundle", show_progress=False)
            build_s = time.perf_counter() - t
            emulator, _, plan = load_bundle(Path(tmp) / "bundle")
            by_block = tensor_bytes_by_block(Path(tmp) / "bundle" / "model.safetensors", find_blocks(emulator).path)
            middle_bytes = sum(by_block[plan.emulator_index(i)] for i in plan.kept_middle)
            bundle_bytes = sum(f.stat().st_size for f in (Path(tmp) / "bundle").iterdir())
            protection = lm.mean_token_loss(emulator, general, tokenizer.pad_token_id)
            zs_emulator = lm.mean_token_loss(emulator, held, tokenizer.pad_token_id)
            zs_emulator_accuracy = exact_match(emulator, tokenizer, tasks)
            fed = federate(base, Path(tmp) / "bundle", folders, s)
        label = name if args.train_extra == "norm" else f"{name} [{args.train_extra or 'blocks only'}]"
        rows[label] = {"train_extra": args.train_extra, "build_s": round(build_s, 1), "kept_middle": list(plan.kept_middle), "middle_bytes": middle_bytes,
                      "bundle_bytes": bundle_bytes, "emulator_general_loss": round(protection, 4),
                      "protection_margin": round(protection - full_general, 4), "emulator_zero_shot": round(zs_emulator, 4),
                      "emulator_zero_shot_accuracy": round(zs_emulator_accuracy, 4),
                      **{k: round(v, 4) for k, v in fed.items() if k in ("emulator_with_adapter", "plug_in", "plug_in_accuracy")},
                      "gap_closure": round((zero_shot - fed["plug_in"]) / (zero_shot - central), 4)}
        print(label, rows[label], flush=True)
    out = ROOT / "bench" / "results" / "emulator_strategies.json"
    previous = json.loads(out.read_text()) if out.is_file() else {}
    if previous.get("full_zero_shot") == round(zero_shot, 4):  # rows of other variants on the same base are kept
        rows = {**previous["variants"], **rows}
    print(f"\n{'variant':<14}{'kept':>10}{'emulator loss (general)':>25}{'margin vs full':>16}{'emulator task':>15}"
          f"{'plug-in':>10}{'gap_closure':>13}{'exact match':>13}{'middle MB':>11}{'build s':>9}")
    for name, r in rows.items():
        print(f"{name:<14}{str(r['kept_middle']):>10}{r['emulator_general_loss']:>25.3f}{r['protection_margin']:>16.3f}"
              f"{r.get('emulator_zero_shot_accuracy', float('nan')):>15.1%}{r['plug_in']:>10.3f}{r['gap_closure']:>13.3f}"
              f"{r.get('plug_in_accuracy', float('nan')):>13.1%}{r['middle_bytes'] / 1e6:>11.2f}{r['build_s']:>9.0f}")
    write_json(out, {"full_zero_shot": round(zero_shot, 4),
                     "full_zero_shot_accuracy": round(zero_shot_accuracy, 4),
                     "central_full_finetune": round(central, 4), "full_general_loss": round(full_general, 4),
                     "distill_steps": args.distill_steps, "variants": rows})
    frontier_svg(rows, ROOT / "bench" / "results" / "frontier.svg")


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """The names of the points no other point beats on both coordinates (higher is better on each), by x."""
    return sorted((n for n, (x, y) in points.items()
                   if not any(x2 >= x and y2 >= y and (x2, y2) != (x, y) for x2, y2 in points.values())),
                  key=lambda n: points[n][0])


def frontier_svg(rows: dict[str, dict], path: Path, width: int = 640, height: int = 420) -> None:
    """Protection margin (x) against gap_closure (y), every variant a labelled point, the frontier a line."""
    points = {n: (r["protection_margin"], r["gap_closure"]) for n, r in rows.items()}
    xs, ys = [x for x, _ in points.values()], [y for _, y in points.values()]
    x0, x1 = min(xs + [0.0]), max(xs + [0.1]) * 1.1 + 1e-3
    y0, y1 = min(ys) - 0.02, max(ys) + 0.02
    left, bottom, right, top = 70, height - 50, width - 20, 20

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{bottom}" x2="{left}" y2="{top}" stroke="black"/>',
             f'<text x="{(left + right) / 2}" y="{height - 12}" text-anchor="middle">protection: emulator alone minus full '
             f'model, loss on general text (nats)</text>',
             f'<text x="16" y="{(top + bottom) / 2}" text-anchor="middle" transform="rotate(-90 16 {(top + bottom) / 2})">'
             f'utility: gap_closure of the plug-in</text>']
    for i in range(5):
        x, y = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        (px, _), (_, py) = at(x, y0), at(x0, y)
        parts += [f'<text x="{px}" y="{bottom + 15}" text-anchor="middle">{x:.3f}</text>',
                  f'<text x="{left - 6}" y="{py + 4}" text-anchor="end">{y:.3f}</text>']
    line = " ".join("%.1f,%.1f" % at(*points[n]) for n in pareto(points))
    parts.append(f'<polyline points="{line}" fill="none" stroke="#c33" stroke-width="1.5"/>')
    for name, (x, y) in points.items():
        px, py = at(x, y)
        parts += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3.5" fill="#246"/>',
                  f'<text x="{px + 6:.1f}" y="{py - 5:.1f}">{name}</text>']
    path.write_text("\n".join(parts + ["</svg>"]) + "\n")


if __name__ == "__main__":
    main()
