"""Client training speed and peak memory: full fine-tuning vs Offsite-Tuning on a 2-8-2 emulator, on CPU.

    .venv/bin/python bench/client_speed.py [--hidden 1024 --batch 4 --seq-len 128 --warmup 2 --steps 4]

One 24-block LLaMA-style model (random init: speed does not depend on the weights, tied embeddings) is
saved once under runs/bench/, and two emulator bundles are built from it with the project's own `build`
(bottom 2 + top 2 adapter blocks, 8 of the 20 middle blocks kept by uniform drop; fp32, and nf4 middle).
Each variant then trains in a fresh subprocess, same batch, sequence length, data and bf16 setting
(`lm.cpu_has_fast_bf16()`, decided once), through `lm.train` with torch AdamW:

    full       full fine-tuning of the full model, every parameter trainable
    ot-full    Offsite-Tuning: the adapter blocks train whole on the fp32 emulator (the paper)
    ot-lora    the same emulator, LoRA (r=8, every linear) inside the adapter blocks only
    ot-lora-nf4  LoRA on the emulator whose middle blocks are nf4 (bitsandbytes, QLoRA-style)
    ot-lora-nf4-ckpt  the same with gradient checkpointing (non-reentrant), as the client runs it QLoRA-style

Measured: tokens/s (input positions, batch x seq_len per step) over `--steps` optimizer steps after
`--warmup` untimed ones (timed between on_step callbacks); the kernel's VmHWM at the end of the child (all
resident pages, file-backed included, loading and imports included) as it is, with the VmRSS after imports
so the reader can subtract; the sampled peak of RssAnon (every 20 ms); and a byte count of the weights,
gradients and optimizer state the child holds; and, after VmHWM is read, the bytes of the tensors autograd
saves for backward in one more forward of the batch (activations, parameters excluded). The machine may be
shared: each child also records the CPU time other processes took during its timed steps (/proc/stat) and
the run warns when that exceeds 5%. Ratios are to `full` (higher = better for the variant).

Analytical per-token FLOPs ignore attention-score FLOPs (QK^T, AV) and norms: full FT 6*N_full;
Offsite-Tuning 2*N_emu forward + 2*N_emu activation gradients (down to the bottom adapter) +
2*N_trainable weight gradients. With tied embeddings N counts the LM head once, which is where the
embedding's FLOPs are. Analytical memory (weights and optimizer only, no activations): full FT 16 bytes
(fp32 weight, grad, two Adam moments) x N_full; OT full adapter 4*N_emu + 12*N_adapter; LoRA 4*N_emu +
16*N_lora; nf4 0.5*N_middle + 4*(N_emu - N_middle) + 16*N_lora. All N are counted on the loaded models.
The paper's anchors (Offsite-Tuning, Xiao et al. 2023, on GPUs and far larger models): 6.5x throughput,
5.6x memory.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("full", "ot-full", "ot-lora", "ot-lora-nf4", "ot-lora-nf4-ckpt")
PAPER = {"throughput": 6.5, "memory": 5.6}

CHILD = r"""
import json, os, sys, threading, time, warnings
def busy_seconds():  # CPU time the whole machine spent busy (all processes), from /proc/stat
    ticks = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
peak = {"anon": 0}
stop = False
def sample():
    while not stop:
        peak["anon"] = max(peak["anon"], status("RssAnon:"))
        time.sleep(0.02)
warnings.filterwarnings("ignore")
import torch, transformers, peft, bitsandbytes
from transformers.utils import logging as hf_logging
from offsite import lm
from offsite.emulator.blocks import find_blocks
from offsite.emulator.build import load_base
from offsite.emulator.bundle import load_bundle
from offsite.emulator.methods import MethodConfig, attach
hf_logging.set_verbosity_error()
variant, folder, batch, seq_len, warmup, steps, bf16, vocab = sys.argv[1:9]
batch, seq_len, warmup, steps, vocab, bf16 = int(batch), int(seq_len), int(warmup), int(steps), int(vocab), bf16 == "1"
baseline = {"rss": status("VmRSS:"), "hwm": status("VmHWM:"), "anon": status("RssAnon:")}
threading.Thread(target=sample, daemon=True).start()
torch.manual_seed(0)

def numel(p):  # logical size: a packed 4-bit weight knows its real shape
    qs = getattr(p, "quant_state", None)
    return qs.shape.numel() if qs is not None else p.numel()

def nbytes(p):
    total = p.numel() * p.element_size()
    qs = getattr(p, "quant_state", None)
    if qs is not None:
        for t in (qs.absmax, qs.code, getattr(qs.state2, "absmax", None), getattr(qs.state2, "code", None)):
            total += t.numel() * t.element_size() if t is not None else 0
    return total

if variant == "full":
    model, _ = load_base(folder)
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    n_emu = n_middle = None
else:
    model, _, plan = load_bundle(folder)
    blocks = find_blocks(model).blocks
    adapter_idx = {plan.emulator_index(i) for i in plan.adapter_blocks}
    n_emu = sum(numel(p) for p in model.parameters())
    n_middle = sum(numel(p) for i, b in enumerate(blocks) if i not in adapter_idx for p in b.parameters())
    method = MethodConfig(name="full") if variant == "ot-full" else MethodConfig(name="lora", r=8, alpha=16)
    if variant.endswith("ckpt"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, params = attach(model, plan, method, on_emulator=True)
loaded = {"rss": status("VmRSS:"), "hwm": status("VmHWM:"), "anon": status("RssAnon:")}
n_total = sum(numel(p) for p in model.parameters())
n_trainable = sum(p.numel() for p in params)
weight_bytes = sum(nbytes(p) for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())

gen = torch.Generator().manual_seed(0)
rows = torch.randint(3, vocab, (batch * (warmup + steps), seq_len), generator=gen).tolist()
optimizers, stamps = [], []
def make_opt(p, **kw):
    optimizers.append(torch.optim.AdamW(p, **kw))
    return optimizers[-1]
cfg = lm.TrainConfig(epochs=1.0, lr=1e-4, batch_size=batch, warmup_steps=1, seed=0, bf16=bf16, max_steps=warmup + steps)
stats = lm.train(model, rows, params, 0, cfg, desc=variant, show_progress=False,
                 on_step=lambda step, total: stamps.append((time.perf_counter(), time.process_time(), busy_seconds())),
                 optimizer=make_opt)
stop = True
first, last = stamps[warmup - 1], stamps[-1]
seconds, own_cpu = last[0] - first[0], last[1] - first[1]
other_cpu = max(0.0, last[2] - first[2] - own_cpu)  # other processes' CPU time during the timed steps
opt_bytes = sum(t.numel() * t.element_size() for s in optimizers[0].state.values() for t in s.values() if torch.is_tensor(t))
vm_hwm = status("VmHWM:")
# Activations: bytes autograd saves for backward in one more forward (same batch, after VmHWM is read),
# each storage once, parameters left out.
param_ptrs = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
saved = {}
def pack(t):
    storage = t.untyped_storage()
    if storage.data_ptr() not in param_ptrs:
        saved[storage.data_ptr()] = storage.nbytes()
    return t
ids = torch.tensor(rows[:batch])
model.train()
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
    loss, _ = lm.token_loss_sum(model, ids, torch.ones_like(ids), ids)
del loss
print(json.dumps({
    "variant": variant, "steps_timed": steps, "seconds": seconds, "step_seconds_after_first": [round(b[0] - a[0], 3) for a, b in zip(stamps, stamps[1:])],
    "own_cpu_seconds": own_cpu, "other_cpu_seconds": other_cpu, "other_cpu_share": other_cpu / (len(os.sched_getaffinity(0)) * seconds),
    "tokens_per_s": batch * seq_len * steps / seconds, "last_loss": stats.last_loss,
    "n_params": n_total, "n_trainable": n_trainable, "n_emulator": n_emu, "n_middle": n_middle,
    "bytes": {"weights": weight_bytes, "grads": sum(p.numel() * p.element_size() for p in params), "optimizer": opt_bytes},
    "saved_activation_bytes": sum(saved.values()),
    "baseline_after_imports": baseline, "after_load": loaded,
    "vm_hwm": vm_hwm, "peak_anon_sampled": peak["anon"], "threads": torch.get_num_threads(),
}))
"""


def make_model(folder: Path, layers: int, hidden: int, intermediate: int, heads: int, vocab: int) -> None:
    """A random LLaMA-style model with a word-level tokenizer of `vocab` made-up tokens (build needs one)."""
    if (folder / "config.json").exists() and list(folder.glob("*.safetensors")):
        return
    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    specials = ["<pad>", "<s>", "</s>"]
    words = {w: i for i, w in enumerate(specials + [f"t{i}" for i in range(vocab - len(specials))])}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<pad>")),
                                  pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    config = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                  max_position_embeddings=2048, tie_word_embeddings=True, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))


def make_bundle(model_dir: Path, out: Path, keep: int, quantize: str | None) -> None:
    """Build with the project's `build` in a subprocess (its memory stays out of this process)."""
    if (out / "offsite-manifest.json").exists():
        return
    code = ("import sys, warnings; warnings.filterwarnings('ignore')\n"
            "from offsite.emulator.build import build\nfrom offsite.emulator.config import EmulatorConfig\n"
            "build(sys.argv[1], EmulatorConfig(bottom=2, top=2, emulator_layers=int(sys.argv[3]), strategy='uniform',"
            " quantize=sys.argv[4] or None), sys.argv[2], show_progress=False)")
    subprocess.run([sys.executable, "-c", code, str(model_dir), str(out), str(keep), quantize or ""], check=True,
                   capture_output=True, text=True)


def analytical(runs: dict) -> dict:
    """Per-token FLOPs and weight+optimizer bytes of each variant, from the parameter counts the children saw."""
    n_full = runs["full"]["n_params"]
    out = {"full": {"flops_per_token": 6 * n_full, "bytes": 16 * n_full}}
    if "ot-full" in runs:
        r = runs["ot-full"]
        out["ot-full"] = {"flops_per_token": 4 * r["n_emulator"] + 2 * r["n_trainable"],
                          "bytes": 4 * r["n_emulator"] + 12 * r["n_trainable"]}
    if "ot-lora" in runs:
        r = runs["ot-lora"]
        out["ot-lora"] = {"flops_per_token": 4 * r["n_emulator"] + 2 * r["n_trainable"],
                          "bytes": 4 * r["n_emulator"] + 16 * r["n_trainable"]}
    for v in ("ot-lora-nf4", "ot-lora-nf4-ckpt"):  # checkpointing adds a forward (2 N_emu) per token
        if v in runs:
            r = runs[v]
            out[v] = {"flops_per_token": (6 if v.endswith("ckpt") else 4) * r["n_emulator"] + 2 * r["n_trainable"],
                      "bytes": 0.5 * r["n_middle"] + 4 * (r["n_emulator"] - r["n_middle"]) + 16 * r["n_trainable"]}
    for v in out.values():
        v["flops_ratio"] = round(out["full"]["flops_per_token"] / v["flops_per_token"], 3)
        v["memory_ratio"] = round(out["full"]["bytes"] / v["bytes"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 8/3 x hidden, rounded to 256")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--keep", type=int, default=8, help="middle blocks the emulator keeps (uniform drop)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1 (the timed window starts at a warm-up step's end)")
    if "full" not in variants or any(v not in VARIANTS for v in variants):
        parser.error(f"--variants: a comma list of {', '.join(VARIANTS)} that includes full")
    intermediate = args.intermediate or round(args.hidden * 8 / 3 / 256) * 256

    from offsite import lm
    bf16 = lm.cpu_has_fast_bf16()
    work = ROOT / "runs" / "bench"
    name = f"speed-L{args.layers}-h{args.hidden}-i{intermediate}-v{args.vocab}-a{args.heads}"
    model_dir = work / name
    start = time.perf_counter()
    make_model(model_dir, args.layers, args.hidden, intermediate, args.heads, args.vocab)
    folders = {"full": model_dir}
    for quantize in (None, "nf4"):
        bundle = work / f"{name}-emu-2-{args.keep}-2-{quantize or 'fp32'}"
        if any(("nf4" in v) == bool(quantize) and v != "full" for v in variants):
            make_bundle(model_dir, bundle, args.keep, quantize)
        for v in variants:
            if v != "full" and ("nf4" in v) == bool(quantize):
                folders[v] = bundle
    print(f"model: {args.layers} blocks, hidden {args.hidden}, intermediate {intermediate}, {args.heads} heads, "
          f"vocab {args.vocab}; emulator 2-{args.keep}-2; batch {args.batch} x seq {args.seq_len}; "
          f"bf16 {bf16}; {args.warmup} warm-up + {args.steps} timed steps (setup {time.perf_counter() - start:.0f} s)",
          flush=True)

    runs = {}
    for v in variants:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, v, str(folders[v]), str(args.batch), str(args.seq_len),
                              str(args.warmup), str(args.steps), "1" if bf16 else "0", str(args.vocab)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{v}: failed (exit {out.returncode})\n{out.stderr[-3000:]}", flush=True)
            runs[v] = {"variant": v, "error": out.stderr[-3000:]}
            continue
        runs[v] = json.loads(out.stdout.strip().splitlines()[-1])
        runs[v]["wall_seconds"] = round(time.perf_counter() - t0, 1)
        r = runs[v]
        print(f"  {v}: {r['tokens_per_s']:.0f} tok/s, VmHWM {r['vm_hwm'] / 2**20:.0f} MiB, {r['wall_seconds']:.0f} s in all; "
              f"step times {r['step_seconds_after_first']} s; other processes used {100 * r['other_cpu_share']:.0f}% of the CPUs "
              f"while timed", flush=True)
    ok = {v: r for v, r in runs.items() if "error" not in r}
    if "full" not in ok:
        sys.exit("full fine-tuning failed: nothing to compare to")
    theory = analytical(ok)
    base = ok["full"]
    for r in ok.values():
        r["state_bytes"] = sum(r["bytes"].values())
    for v, r in ok.items():
        r["throughput_ratio"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
        r["hwm_ratio"] = round(base["vm_hwm"] / r["vm_hwm"], 3)
        r["hwm_above_baseline_ratio"] = round((base["vm_hwm"] - base["baseline_after_imports"]["rss"])
                                              / (r["vm_hwm"] - r["baseline_after_imports"]["rss"]), 3)
        r["anon_above_baseline_ratio"] = round((base["peak_anon_sampled"] - base["baseline_after_imports"]["anon"])
                                               / (r["peak_anon_sampled"] - r["baseline_after_imports"]["anon"]), 3)
        r["state_ratio"] = round(base["state_bytes"] / r["state_bytes"], 3)
        r["analytical"] = theory[v]
        r["throughput_vs_analytical"] = round(r["throughput_ratio"] / theory[v]["flops_ratio"], 3)

    mib = 2**20
    print(f"\n{'variant':<12} {'params':>8} {'trainable':>10} {'tok/s':>7} {'x full':>7} {'FLOP x':>7} {'% of FLOP x':>11}"
          f" {'VmHWM MiB':>9} {'x full':>7} {'-base x':>7} {'state MiB':>9} {'x full':>7} {'theory x':>8} {'act MiB':>7}")
    for v, r in ok.items():
        a = r["analytical"]
        print(f"{v:<12} {r['n_params'] / 1e6:>7.1f}M {r['n_trainable'] / 1e6:>9.2f}M {r['tokens_per_s']:>7.0f}"
              f" {r['throughput_ratio']:>6.2f}x {a['flops_ratio']:>6.2f}x {100 * r['throughput_vs_analytical']:>10.0f}%"
              f" {r['vm_hwm'] / mib:>9.0f} {r['hwm_ratio']:>6.2f}x {r['hwm_above_baseline_ratio']:>6.2f}x"
              f" {r['state_bytes'] / mib:>9.0f} {r['state_ratio']:>6.2f}x {a['memory_ratio']:>7.2f}x"
              f" {r['saved_activation_bytes'] / mib:>7.0f}")
    print(f"baseline after imports (VmRSS): {base['baseline_after_imports']['rss'] / mib:.0f} MiB; '-base x' divides "
          f"VmHWM minus that baseline; 'state' = weights + grads + AdamW state held; 'theory x' = analytical bytes ratio;\n"
          f"'act' = tensors autograd saves for backward in one forward of the batch (parameters excluded)")
    busy = [v for v, r in ok.items() if r["other_cpu_share"] > 0.05]
    if busy:
        print(f"WARNING: other processes used more than 5% of the CPUs during the timed steps of {', '.join(busy)}: "
              f"their tokens/s are low by about that share or more")
    print(f"paper's anchors (for reference, GPU, far larger models): {PAPER['throughput']}x throughput, "
          f"{PAPER['memory']}x memory")
    aims = {}
    if "ot-lora" in ok:
        aims["ot_lora_throughput_vs_analytical"] = ok["ot-lora"]["throughput_vs_analytical"]
        print(f"aim: ot-lora reaches >= 80% of its analytical throughput ratio: "
              f"{100 * aims['ot_lora_throughput_vs_analytical']:.0f}%")
    for v in ("ot-lora-nf4", "ot-lora-nf4-ckpt"):
        if v in ok:
            aims[f"{v}_memory_ratio_hwm"] = ok[v]["hwm_ratio"]
            aims[f"{v}_memory_ratio_above_baseline"] = ok[v]["hwm_above_baseline_ratio"]
            print(f"aim: {v} peak memory >= 8x below full: VmHWM {ok[v]['hwm_ratio']:.2f}x as is, "
                  f"{ok[v]['hwm_above_baseline_ratio']:.2f}x above the import baseline")

    results = {"config": {"layers": args.layers, "hidden": args.hidden, "intermediate": intermediate, "heads": args.heads,
                          "vocab": args.vocab, "emulator": f"2-{args.keep}-2 uniform", "batch": args.batch,
                          "seq_len": args.seq_len, "warmup_steps": args.warmup, "timed_steps": args.steps,
                          "bf16": bf16, "lora": {"r": 8, "alpha": 16, "targets": "every linear in the adapter blocks"},
                          "machine": _machine(base["threads"])},
               "paper": PAPER, "aims": aims, "runs": runs}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "client_speed.json").write_text(json.dumps(results, indent=2) + "\n")


def _machine(threads: int) -> dict:
    import os
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"cpu": model, "cpus": len(os.sched_getaffinity(0)), "torch_threads": threads,
            "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


if __name__ == "__main__":
    main()
