"""Peak memory of `offsite emulator build` on a ~1 GB random LLaMA-style model, as a ratio to the model.

    .venv/bin/python bench/build_memory.py [--layers 16 --hidden 1024]

The model is saved once to runs/bench/mem-model; the build then runs in a fresh subprocess that samples
its anonymous resident memory (RssAnon, what the process really holds; mmap'd safetensors pages are
file-backed and reclaimable) every 20 ms. Reported: peak RssAnon above the post-import baseline, and the
kernel's VmHWM (all resident pages, file-backed included), each divided by the model's fp32 bytes.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, threading, time
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
peak = {"anon": 0}
stop = False
def sample():
    while not stop:
        peak["anon"] = max(peak["anon"], rss("RssAnon:"))
        time.sleep(0.02)
import torch, transformers
from offsite.emulator.build import build
from offsite.emulator.config import EmulatorConfig
base_anon = rss("RssAnon:")
t = threading.Thread(target=sample, daemon=True); t.start()
start = time.perf_counter()
result = build(sys.argv[1], EmulatorConfig(bottom=2, top=2, emulator_layers=int(sys.argv[3]), quantize=sys.argv[4] or None), sys.argv[2], show_progress=False)
seconds = time.perf_counter() - start
stop = True; t.join()
print(json.dumps({"baseline_anon": base_anon, "peak_anon": peak["anon"], "vm_hwm": rss("VmHWM:"), "seconds": seconds,
                  "full_params": result.full_params, "emulator_params": result.emulator_params}))
"""


def make_model(folder: Path, layers: int, hidden: int) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models
    if not (folder / "model.safetensors").exists() and not list(folder.glob("*.safetensors")):
        config = AutoConfig.for_model("llama", vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(str(folder), safe_serialization=True)
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        tok.save_pretrained(str(folder))
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--keep", type=int, default=6, help="middle blocks the emulator keeps")
    args = parser.parse_args()
    work = ROOT / "runs" / "bench"
    model_dir = work / "mem-model"
    model_bytes = make_model(model_dir, args.layers, args.hidden)
    results = {"model_bytes": model_bytes, "layers": args.layers, "hidden": args.hidden, "runs": {}}
    for quantize in ("", "nf4"):
        out = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), str(work / f"mem-bundle-{quantize or 'fp32'}"),
                              str(args.keep), quantize], check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["anon_ratio"] = round((r["peak_anon"] - r["baseline_anon"]) / model_bytes, 3)
        r["hwm_ratio"] = round(r["vm_hwm"] / model_bytes, 3)
        results["runs"][quantize or "fp32"] = r
        print(f"build {quantize or 'fp32':>4}: model {model_bytes / 2**20:.0f} MiB; peak anonymous memory above baseline "
              f"{(r['peak_anon'] - r['baseline_anon']) / 2**20:.0f} MiB = {r['anon_ratio']:.2f}x the model; "
              f"VmHWM {r['vm_hwm'] / 2**20:.0f} MiB = {r['hwm_ratio']:.2f}x; {r['seconds']:.0f} s", flush=True)
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "build_memory.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
