"""Every role at real size: a ~1 B-parameter base in bf16, through the real processes, as ratios to the base.

    .venv/bin/python bench/real_size.py [--family llama qwen2] [--bundle bf16 nf4] [--no-gradient-checkpointing]

A LLaMA-shaped base of 1.1 B parameters (TinyLlama's shape: 22 blocks of width 2048, untied) and a
Qwen2-shaped one of 0.5 B (24 blocks of width 896, tied embeddings: a third of it is the embedding table),
random weights, stored as model owners store them (bf16, sharded safetensors), built on the spot. Each
goes through `offsite cloud init`, `jobs create` (emulator 2 + 9 + 2 blocks, or 2 + 10 + 2 of 24; bf16
bundle, then nf4), `serve` through finalization and export, and two `client run` processes with LoRA
and gradient checkpointing (as a data owner short of memory runs them), one round. Each process's peak
RSS (VmHWM) and peak anonymous RSS, sampled every 20 ms, and the bundle and export sizes are divided by
the base's size on disk. The export is then loaded with plain transformers and its logits
compared with the plug-in's. Results in bench/results/real_size.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from offsite import precision
from offsite.demo import domain
from offsite.demo.base import train_tokenizer
from offsite.emulator.plugin import plug_in
from offsite.tensors import load_blob

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {  # TinyLlama-1.1B's shape; Qwen2-0.5B's (tied embeddings)
    "llama": dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                  num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False, emulator_layers=9),
    "qwen2": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, emulator_layers=10),
}


def make_base(folder: Path, family: str) -> Path:
    """The base, random weights in bf16, in shards of 500 MB (as hub checkpoints come); made once."""
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    shape = dict(FAMILIES[family])
    shape.pop("emulator_layers")
    tokenizer = train_tokenizer(domain.make_client_records(0, 1, 400, 1.0, seed=0), vocab_size=500)
    config = AutoConfig.for_model(shape.pop("model_type"), **shape, max_position_embeddings=2048,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(folder), max_shard_size="500MB")
    tokenizer.save_pretrained(str(folder))
    return folder


def offsite(*args: str) -> list[str]:
    return [sys.executable, "-m", "offsite.cli", *args]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Start `cmd`, with a thread that samples its memory every 20 ms until it exits (see finish)."""
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    proc.peak = {"VmHWM": 0, "RssAnon": 0}

    def sample() -> None:
        while proc.poll() is None:
            try:
                now = status(proc.pid)
            except (FileNotFoundError, ProcessLookupError):
                return
            proc.peak = {k: max(v, now.get(k, 0)) for k, v in proc.peak.items()}
            time.sleep(0.02)

    proc.sampler = threading.Thread(target=sample, daemon=True)
    proc.sampler.start()
    return proc


def status(pid: int) -> dict[str, int]:
    """VmHWM (peak resident: anonymous + file-backed pages, reset at exec) and RssAnon, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "RssAnon"):
                out[key] = int(value.split()[0]) * 1024
    return out


def finish(proc: subprocess.Popen, what: str, log: Path) -> dict[str, int]:
    """Wait for `proc`; its peak RSS (VmHWM) and peak anonymous RSS, as sampled. Not ru_maxrss: the
    kernel carries that over from the forked parent across exec."""
    if proc.wait():
        raise RuntimeError(f"{what} exited {proc.returncode}; see {log}")
    proc.sampler.join()
    return {"rss": proc.peak["VmHWM"], "anon": proc.peak["RssAnon"]}


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def file_dtypes(folder: Path) -> list[str]:
    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    return sorted(dtypes)


def job_toml(base: Path, data: Path, family: str, quantize: str | None, export: Path, checkpointing: bool) -> str:
    return f"""[job]
id = "real"
base_model = "{base}"
rounds = 1
clients_per_round = 2
export_dir = "{export}"

[split]
bottom = 2
top = 2
emulator_layers = {FAMILIES[family]['emulator_layers']}
{f'quantize = "{quantize}"' if quantize else ''}

[training]
epochs = 1
lr = 1e-4
batch_size = 4
max_length = 64
gradient_checkpointing = {str(checkpointing).lower()}

[adapter]
method = "lora"
r = 8

[eval]
sets = {{ all = "{data / 'client-1' / 'heldout.jsonl'}" }}
"""


def run(family: str, quantize: str | None, work: Path, base: Path, checkpointing: bool) -> dict:
    out = work / f"{family}-{quantize or 'bf16'}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    logs = out / "logs"
    logs.mkdir(parents=True)
    data = out / "data"
    folders = domain.write_clients(data, 2, 24, 8, 0.5, 0)
    (out / "job.toml").write_text(job_toml(base, data, family, quantize, out / "export", checkpointing))
    state, phases, peaks = out / "cloud", {}, {}

    def timed(name: str, cmd: list[str]) -> None:
        started = time.perf_counter()
        peaks[name] = finish(start(cmd, logs / f"{name}.log"), name, logs / f"{name}.log")
        phases[name] = round(time.perf_counter() - started, 1)

    timed("init", offsite("cloud", "init", "--state", str(state), "--clients", "client-1,client-2"))
    timed("jobs_create", offsite("cloud", "jobs", "create", "--state", str(state), "--config", str(out / "job.toml")))
    started = time.perf_counter()
    server = start(offsite("cloud", "serve", "--state", str(state), "--address", "127.0.0.1:0", "--port-file",
                           str(state / "port"), "--exit-when-done"), logs / "serve.log")
    while not (state / "port").exists():
        if server.poll() is not None:
            raise RuntimeError(f"serve exited {server.returncode}; see {logs / 'serve.log'}")
        time.sleep(0.2)
    ports = json.loads((state / "port").read_text())
    clients = {}
    for folder in folders:
        clients[folder.name] = start(offsite(
            "client", "run", "--server", f"localhost:{ports['port']}", "--enroll-server", f"localhost:{ports['enroll_port']}",
            "--ca", str(state / "tls" / "ca.pem"), "--workdir", str(out / "clients" / folder.name),
            "--data", str(folder / "train.jsonl"), "--token-file", str(state / "tokens" / f"{folder.name}.token"),
            "--threads", "1", "--no-progress"), logs / f"{folder.name}.log")
    for name, proc in clients.items():
        peaks[name] = finish(proc, name, logs / f"{name}.log")
    phases["clients"] = round(time.perf_counter() - started, 1)
    peaks["serve"] = finish(server, "serve", logs / "serve.log")
    phases["serve_through_finalize"] = round(time.perf_counter() - started, 1)

    base_bytes = size(base)
    report = json.loads((state / "jobs" / "real" / "report.json").read_text())
    bundle = state / "jobs" / "real" / "bundle"
    blob_bytes = sum(p.stat().st_size for p in (state / "blobs").rglob("*") if p.is_file() and p.stat().st_nlink == 1)
    return {
        "family": family, "bundle": quantize or "bf16", "base_bytes": base_bytes,
        "params": report["model"]["params"], "adapter_method": "lora", "gradient_checkpointing": checkpointing,
        "bundle_ratio": round(size(bundle) / base_bytes, 3),
        "blob_store_extra_bytes": blob_bytes,  # blobs that are not hard links of the bundle: adapters, updates
        "export_ratio": round(size(out / "export") / base_bytes, 3), "export_dtypes": file_dtypes(out / "export"),
        "export_shards": len(list((out / "export").glob("*.safetensors"))),
        # peak RSS counts the safetensors pages a process maps while it loads (file-backed, reclaimable);
        # peak anonymous RSS is what it holds itself
        "peak_rss_ratio": {k: round(v["rss"] / base_bytes, 3) for k, v in peaks.items()},
        "peak_anon_ratio": {k: round(v["anon"] / base_bytes, 3) for k, v in peaks.items()},
        "peak_rss_gib": {k: round(v["rss"] / 2**30, 2) for k, v in peaks.items()},
        "seconds": phases,
        "export_matches_plug_in": export_matches(base, out / "export", state),
    }


def export_matches(base: Path, export: Path, state: Path) -> float:
    """Max |logit difference| between the export loaded with plain transformers and the plug-in."""
    from offsite.cloud.coordinator import Coordinator

    coordinator = Coordinator.open(state)
    plan = coordinator.job("real").artifacts.plan
    adapter = load_blob(coordinator.blobs.open_path(coordinator.state.global_adapters("real")[-1]))
    ids = torch.randint(3, 400, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plugged, _ = plug_in(str(base), plan, adapter)
        want = plugged(input_ids=ids).logits
        del plugged
        exported = precision.prepare(AutoModelForCausalLM.from_pretrained(str(export)))
        return float((exported(input_ids=ids).logits - want).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    ap.add_argument("--bundle", nargs="+", default=["bf16", "nf4"], choices=["bf16", "nf4"])
    ap.add_argument("--no-gradient-checkpointing", dest="checkpointing", action="store_false",
                    help="clients keep every activation for backward (faster, more memory)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench" / "real-size"))
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "real_size.json"))
    args = ap.parse_args()
    work = Path(args.out)
    rows = []
    for family in args.family:
        base = make_base(work / f"base-{family}", family)
        for bundle in args.bundle:
            row = run(family, None if bundle == "bf16" else bundle, work, base, args.checkpointing)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'family':7} {'bundle':6} {'params':>7} {'bundle':>7} {'export':>7} {'create':>13} {'serve':>13} "
          f"{'client':>13}  (x the base's size on disk; peak RSS / peak anonymous RSS per process)")
    for r in rows:
        p, a = r["peak_rss_ratio"], r["peak_anon_ratio"]
        cell = lambda k: f"{p[k]:.2f} / {a[k]:.2f}"  # noqa: E731
        client = max(("client-1", "client-2"), key=lambda k: p[k])
        print(f"{r['family']:7} {r['bundle']:6} {r['params'] / 1e9:6.2f}B {r['bundle_ratio']:7.3f} {r['export_ratio']:7.3f} "
              f"{cell('jobs_create'):>13} {cell('serve'):>13} {cell(client):>13}")
    results = Path(args.results)
    ran = {(r["family"], r["bundle"]) for r in rows}  # rows run now replace earlier ones of the same family and bundle
    kept = [r for r in json.loads(results.read_text())["rows"] if (r["family"], r["bundle"]) not in ran] if results.is_file() else []
    results.write_text(json.dumps({"machine": f"{os.cpu_count()} CPUs", "rows": kept + rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
