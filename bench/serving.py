"""Serving many jobs from one base: the inference engine (offsite.cloud.infer) against a model per job.

    .venv/bin/python bench/serving.py [--quick] [--methods full lora] [--jobs 1 4 16] [--lora-jobs 1 16]
                                      [--concurrency 1 8 32] [--tokens 64]

The base is a LLaMA shape of 110 M parameters (hidden 768, 12 blocks, 12 heads, intermediate 2048,
vocabulary 32000, tied embeddings, 512 positions), random weights from a seeded config (no download),
fp32 on the CPU, `precision.prepare`d (a no-op for fp32) and in eval mode. Two kinds of job (--methods):
  full  the global adapter is what `extract_adapter(base, plan, on_emulator=False)` gives (the 2 bottom
        and 2 top blocks of `SplitPlan.uniform(12, 2, 2, emulator_layers=2)`, whole) plus 0.02 x seeded
        Gaussian noise on every tensor, so every job differs from the base and from every other job;
        served as `MethodConfig("full")`, the engine holds 4 dense blocks of its own per job and runs
        each job's rows through its own copies of them.
  lora  the global adapter is dense too (offsite aggregates LoRA into dense blocks), the base's adapter
        blocks with every 2-D weight W of an nn.Linear in them (q, k, v, o, gate, up, down) replaced by
        W + B @ A of rank 16 (what 2 aggregated client updates of r = 8 add up to), B and A seeded
        Gaussian per job and scaled so that ||B @ A|| = 1.5% of ||W|| (Frobenius); the norms are exactly
        the base's. Served as `MethodConfig("lora", r=8)`: `build_adapter` factors each change
        (randomized SVD, adapters._low_rank) and holds the job as low-rank deltas only (JobAdapter.blocks
        == {}: the run checks it and prints what a job holds and its bytes, 28 deltas of rank 16, 3.6 MiB
        against a full job's 108 MiB); the base's blocks run once over the whole batch and each job's
        delta is added on its own rows (routing.Router._add_deltas). Loading is where LoRA pays: factoring
        one job takes ~5 s on these 2 cores (a full job loads in ~0.3 s).

Workload: a fixed seeded pool of prompts (random ids, lengths 16..64), greedy decoding of `--tokens` 64
tokens with no end-of-sequence token (`eos_ids=set()`), so every request makes all 64. A cell is a
number of jobs (request i goes to job i mod jobs) and a concurrency c: a closed loop keeps c requests in
flight, submitting the next one (from the client's own thread, as an HTTP handler would) as one
finishes, until N have been served; the engine's `max_batch` is c. Adapters are loaded (and one short
request warms the kernels) before the first cell, so cells measure steady serving, not loading; the load
time is reported alone. Per cell: output tokens/s (all tokens / wall time from the first submit to the
last token), p50/p99 time to first token (submit to first token: queueing, the prefill of the requests
admitted in the same step, one's own prefill), p50/p99 time per output token (every gap between two
consecutive tokens of one request, pooled over the cell's requests: the p99 shows the steps that
prefills of joining requests stall), decode steps and mean rows per step.

Memory, each approach in its own subprocess (this file with --child), peak RSS as the kernel's VmHWM from
/proc/self/status at the child's end (file-backed pages such as torch's libraries included; a `floor`
child that only imports torch, transformers and the engine gives the part every approach pays, and
`net` is VmHWM minus it):
  engine   one base + the jobs' adapters (full: dense blocks; lora: deltas) + the batch's KV cache,
           through every cell of its method and job count
  merged   (a) 16 merged (full) models in one process: the base copied 16 times, each with one job's
           blocks loaded (its exact parameter bytes are reported beside its RSS); no requests are run; a
           merged LoRA model has the same tensors and bytes, so (a) is one row for both
  generate (b) plain `model.generate` (greedy, 64 new tokens, KV cache) one request at a time on one
           merged model (job 0 of the method), on the first prompts of the same pool; time to first
           token and per token from a streamer; one child per method
A sanity line per method compares the engine's greedy tokens (1 job, concurrency 1) with generate's on
job 0's merged model, on the same prompts, and says how many requests are identical (a LoRA job's rows
compute W x + (x D) U where the merged model computes (W + B A) x: fp32 rounding may change a token).

Aims (PASS/FAIL in the printout and the JSON), for each method (`full_...`, `lora_...`), its engine rows
against its own (b):
  1. with 16 jobs, engine peak RSS <= the peak RSS of (b) (one model in a process that serves it: the
     base's bytes and what running torch on it costs beyond the imports, about 0.3 GiB here) + 16 x one
     job's adapter bytes (JobAdapter.nbytes) + the KV cache of the fullest batch (c rows x (longest prompt
     + tokens) positions, fp32 keys and values); the ratio to (a) is printed beside it. The issue's "about 1/5 of (a)" assumes adapters that are a small part of the
     base; here the 4 adapter blocks of 12 are 26% of the base's bytes, so 16 of them are 4.1 bases and
     the bound itself is about 1/3 of (a): the exact-bytes ratio is printed as what to expect. A LoRA
     job's deltas are 0.8% of the base's bytes, so its bound is little more than (b) + the KV cache.
  2. mixed-job throughput (16 jobs) >= 0.8 x the same cell all on one job, at concurrency 8 and at 32.
  3. engine throughput with 16 jobs at concurrency 8 >= 3 x (b).

Size, to keep the default run under ~12 minutes on 2 CPU cores: N = 4 requests at concurrency 1 (a
decode step of this base at batch 1 costs ~0.15 s here), 16 at 8 and 32 at 32 (one wave: every request
starts at once), for both methods; (b) serves the first 4 prompts. Full jobs at 1, 4 and 16 jobs; LoRA
at 1 and 16 only (--lora-jobs 1 4 16 adds the 4-job cells, ~2 more minutes: loading 16 LoRA jobs alone
takes ~80 s). --quick: 1 and 16 jobs of each, concurrency 1 and 8, N = 2 and 8, (b) on 2 prompts. torch uses 2 threads everywhere, with OMP_WAIT_POLICY=PASSIVE in every child
(--omp-wait-policy): the machine this was written on is shared, and with another process on one of the 2
cores, OpenMP's default spin-waiting at each parallel region's barrier made the same forward up to 10x
slower, and by how much changed from run to run and between the main and the engine's thread; sleeping
at the barrier costs a little on an idle machine and keeps the contenders comparable on a busy one. Each
child records the CPU time other processes took while it measured (/proc/stat); the run warns past 10%.
Results in bench/results/serving.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             max_position_embeddings=512, tie_word_embeddings=True)
PLAN = dict(num_blocks=12, bottom=2, top=2, emulator_layers=2)
PROMPT_LENGTHS = (16, 64)   # inclusive
NOISE = 0.02                # each full job's adapter: the base's blocks + NOISE x N(0, 1), seeded per job
LORA_RANK = 16              # each LoRA job's change to a linear weight: rank 2 x r 8, two clients' r = 8 updates summed
LORA_R = 8                  # the r its MethodConfig("lora") says
LORA_CHANGE = 0.015         # ||B @ A|| / ||W|| (Frobenius) for every linear weight of a LoRA job
METHODS = ("full", "lora")
THREADS = 2


def requests_for(concurrency: int, quick: bool) -> int:
    """N, the requests a cell serves."""
    if quick:
        return 2 if concurrency == 1 else max(concurrency, 8)
    return 4 if concurrency == 1 else max(concurrency, 16) if concurrency <= 8 else concurrency


# --- helpers shared by the children -----------------------------------------------------------------
def status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def busy_seconds() -> float:
    """CPU time the whole machine spent busy, all processes (/proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class Others:
    """CPU seconds other processes took, and the share of the machine that was, between start and stop."""

    def __init__(self):
        self.busy, self.own, self.wall = busy_seconds(), time.process_time(), time.perf_counter()

    def stop(self) -> dict:
        others = max(0.0, (busy_seconds() - self.busy) - (time.process_time() - self.own))
        wall = time.perf_counter() - self.wall
        return {"other_cpu_s": round(others, 1), "other_cpu_share": round(others / (wall * (os.cpu_count() or 1)), 3)}


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    at = q * (len(s) - 1)
    lo = int(at)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (at - lo)


def prompt_pool(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(n):  # one prompt after another: the first k are the same whatever n is
        length = int(torch.randint(PROMPT_LENGTHS[0], PROMPT_LENGTHS[1] + 1, (1,), generator=g))
        pool.append(torch.randint(3, vocab, (length,), generator=g).tolist())
    return pool


WARMUP_PROMPT = list(range(3, 19))  # 16 tokens, in no pool: one short untimed request before timing


def build_base():
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from offsite import precision

    torch.set_num_threads(THREADS)
    config = LlamaConfig(**SHAPE, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    return precision.prepare(model).eval()


def plan():
    from offsite.emulator.plan import SplitPlan

    return SplitPlan.uniform(PLAN["num_blocks"], PLAN["bottom"], PLAN["top"], emulator_layers=PLAN["emulator_layers"])


def base_tensors(blocks, path: str, p) -> dict:
    """The base's adapter tensors under their canonical names, as extract_adapter(model, plan,
    on_emulator=False) names them, but read from the block list and not copied (the engine wraps the
    model's blocks, so the model's own names no longer say `path.i.`); the merged child checks them
    against extract_adapter."""
    return {f"{path}.{i}.{name}": t.detach() for i in p.adapter_blocks for name, t in blocks[i].named_parameters()}


def job_tensors(blocks, path: str, p, job: int) -> dict:
    """Job `job`'s global adapter: the base's adapter tensors + NOISE x N(0, 1), seeded by the job; made
    when the job is loaded, as a service reads it from its blob store."""
    import torch

    g = torch.Generator().manual_seed(1000 + job)
    return {k: v + NOISE * torch.randn(v.shape, generator=g, dtype=v.dtype)
            for k, v in sorted(base_tensors(blocks, path, p).items())}


def lora_tensors(blocks, path: str, p, job: int) -> dict:
    """LoRA job `job`'s global adapter as offsite aggregates it, dense: the base's adapter tensors with every
    2-D weight W of an nn.Linear in them replaced by W + B @ A, B (out, LORA_RANK) and A (LORA_RANK, in)
    seeded Gaussian, scaled so that ||B @ A|| = LORA_CHANGE x ||W||; every other tensor (the norms) the
    base's own."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(2000 + job)
    out = base_tensors(blocks, path, p)
    for i in p.adapter_blocks:
        for name, module in sorted(blocks[i].named_modules(), key=lambda m: m[0]):
            if type(module) is nn.Linear and module.weight.dim() == 2:
                w = module.weight.detach()
                b = torch.randn(w.shape[0], LORA_RANK, generator=g, dtype=w.dtype)
                a = torch.randn(LORA_RANK, w.shape[1], generator=g, dtype=w.dtype)
                change = b @ a
                out[f"{path}.{i}.{name}.weight"] = w + change * (LORA_CHANGE * w.norm() / change.norm())
    return dict(sorted(out.items()))


def adapter_tensors(method: str, blocks, path: str, p, job: int) -> dict:
    return (lora_tensors if method == "lora" else job_tensors)(blocks, path, p, job)


def method_config(method: str):
    from offsite.emulator.methods import MethodConfig

    return MethodConfig("lora", r=LORA_R) if method == "lora" else MethodConfig("full")


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def emit_result(result: dict) -> None:
    result.setdefault("vmhwm", status("VmHWM"))
    result["rss_anon"] = status("RssAnon")
    print("RESULT " + json.dumps(result), flush=True)


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- the children -----------------------------------------------------------------------------------
def child_floor(spec: dict) -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from offsite.cloud.infer import adapters, engine  # noqa: F401

    torch.set_num_threads(THREADS)
    emit_result({})


def child_merged(spec: dict) -> None:
    """(a): one merged model per job, all in this process."""
    import torch

    from offsite.emulator.adapter import extract_adapter, load_adapter
    from offsite.emulator.blocks import find_blocks

    p = plan()
    base = build_base()
    found = find_blocks(base)
    reference = extract_adapter(base, p, on_emulator=False)
    mine = base_tensors(found.blocks, found.path, p)
    assert set(mine) == set(reference) and all(torch.equal(mine[k], reference[k]) for k in mine)
    del reference, mine
    models = []
    for job in range(spec["jobs"]):  # the base itself becomes the last job's model
        model = base if job == spec["jobs"] - 1 else copy.deepcopy(base)
        load_adapter(model, p, adapter_tensors(spec.get("method", "full"), found.blocks, found.path, p, job),
                     on_emulator=False, share=True)
        models.append(model)
    emit_result({"models": len(models), "param_bytes": sum(model_bytes(m) for m in models),
                 "base_bytes": model_bytes(base)})


def child_generate(spec: dict) -> None:
    """(b): `generate` one request at a time on job 0's merged model (of spec["method"]'s job 0)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    from offsite.emulator.adapter import load_adapter
    from offsite.emulator.blocks import find_blocks

    p = plan()
    model = build_base()
    found = find_blocks(model)
    load_adapter(model, p, adapter_tensors(spec.get("method", "full"), found.blocks, found.path, p, 0), on_emulator=False)
    prompts = prompt_pool(spec["requests"], SHAPE["vocab_size"])

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def generate(prompt, tokens, streamer=None):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False, pad_token_id=0,
                                 streamer=streamer)
        return out[0, len(prompt):].tolist()

    generate(WARMUP_PROMPT, 4)
    others = Others()
    ttft, gaps, outputs, tokens = [], [], [], 0
    start = time.perf_counter()
    for prompt in prompts:
        clock = Clock()
        submitted = time.perf_counter()
        out = generate(prompt, spec["tokens"], clock)
        stamps = clock.times[1:]  # the first put is the prompt
        ttft.append(stamps[0] - submitted)
        gaps += [b - a for a, b in zip(stamps, stamps[1:])]
        tokens += len(out)
        outputs.append(out)
    wall = time.perf_counter() - start
    emit_result({"method": spec.get("method", "full"), "requests": len(prompts), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall,
                 "ttft_p50": quantile(ttft, 0.5), "ttft_p99": quantile(ttft, 0.99),
                 "tpot_p50": quantile(gaps, 0.5), "tpot_p99": quantile(gaps, 0.99), "outputs": outputs,
                 "base_bytes": model_bytes(model), **others.stop()})


def child_engine(spec: dict) -> None:
    """The engine over one base, `jobs` jobs of spec["method"], through every (concurrency, N) cell in `cells`."""
    from offsite.cloud.infer.adapters import AdapterCache, build_adapter
    from offsite.cloud.infer.engine import Engine, Request, Sampling

    kind = spec.get("method", "full")
    p, method = plan(), method_config(kind)
    model = build_base()
    base_bytes = model_bytes(model)
    jobs, tokens = spec["jobs"], spec["tokens"]
    engine: Engine | None = None

    def load(job_id: str):
        r = engine.router
        return build_adapter(job_id, model, r, p, method,
                             adapter_tensors(kind, r.base_blocks, r.path, p, int(job_id.split("-")[1])))

    cache = AdapterCache(load, None)
    engine = Engine(model, set(), cache, max_batch=max(c for c, _ in spec["cells"]), max_queue=1024)
    started = time.perf_counter()
    held = [cache.acquire(f"job-{j}") for j in range(jobs)]
    load_s = time.perf_counter() - started
    for job in held:
        cache.release(job)
    adapter_bytes = held[0].nbytes
    held_as = {"blocks": len(held[0].blocks), "deltas": len(held[0].deltas),
               "delta_ranks": sorted({d.down.shape[1] for d in held[0].deltas.values()})}
    if kind == "lora":   # served as factors on the base's own blocks: no dense block of its own
        assert all(h.blocks == {} and h.deltas for h in held), f"a LoRA job must be held as deltas only: {held_as}"
    else:
        assert len(held[0].blocks) == len(p.adapter_blocks), "a job's adapter must replace every adapter block"
    del held
    engine.start()

    def run_one(model_id, prompt, n):
        done = threading.Event()
        out = []
        engine.submit(Request(model_id, prompt, Sampling(max_tokens=n, temperature=0),
                              lambda e: done.set() if e.finish else out.append(e.token)))
        done.wait()
        return out

    run_one("job-0", WARMUP_PROMPT, 4)
    loaded_vmhwm = status("VmHWM")  # the peak so far: building the base, loading every adapter, the warm-up
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the serving peak, loading left out
    pool = prompt_pool(max(n for _, n in spec["cells"]), SHAPE["vocab_size"])
    cells = []
    for concurrency, n in spec["cells"]:
        engine.max_batch = concurrency
        events: queue.Queue = queue.Queue()
        stamps: list[list[float]] = [[] for _ in range(n)]
        outputs: list[list[int]] = [[] for _ in range(n)]
        submitted, finishes = [0.0] * n, [None] * n

        def emitter(i):
            def emit(event):
                if event.finish is not None:
                    finishes[i] = event.finish
                    events.put(i)
                else:
                    stamps[i].append(time.perf_counter())
                    outputs[i].append(event.token)
            return emit

        def submit(i):
            submitted[i] = time.perf_counter()
            engine.submit(Request(f"job-{i % jobs}", pool[i], Sampling(max_tokens=tokens, temperature=0), emitter(i)))

        steps0 = engine.stats.steps
        others = Others()
        start = time.perf_counter()
        nxt = 0
        while nxt < min(concurrency, n):
            submit(nxt)
            nxt += 1
        for _ in range(n):
            events.get()
            if nxt < n:
                submit(nxt)
                nxt += 1
        wall = max(s[-1] for s in stamps) - start
        steps = engine.stats.steps - steps0
        assert all(f == "length" for f in finishes) and all(len(o) == tokens for o in outputs), finishes
        out_tokens = sum(len(o) for o in outputs)
        ttft = [s[0] - t for s, t in zip(stamps, submitted)]
        gaps = [b - a for s in stamps for a, b in zip(s, s[1:])]
        cell = {"method": kind, "jobs": jobs, "concurrency": concurrency, "requests": n, "tokens": out_tokens, "wall_s": wall,
                "tok_s": out_tokens / wall, "ttft_p50": quantile(ttft, 0.5), "ttft_p99": quantile(ttft, 0.99),
                "tpot_p50": quantile(gaps, 0.5), "tpot_p99": quantile(gaps, 0.99), "steps": steps,
                "mean_batch": round((out_tokens - n) / max(steps, 1), 2), **others.stop()}
        if spec.get("keep_outputs") and concurrency == 1:
            cell["outputs"] = outputs
        cells.append(cell)
        log(f"engine {kind} {jobs:2d} jobs, concurrency {concurrency:2d}: {cell['tok_s']:.1f} tok/s over {wall:.1f} s")
    engine.drain()
    serving_vmhwm = status("VmHWM")
    max_prompt = max(len(pool[i]) for c, n in spec["cells"] for i in range(n))
    per_token = 2 * model.config.num_hidden_layers * model.config.num_key_value_heads * (
        model.config.hidden_size // model.config.num_attention_heads) * 4
    kv_bytes = max(c for c, _ in spec["cells"]) * (max_prompt + tokens) * per_token
    emit_result({"method": kind, "cells": cells, "base_bytes": base_bytes, "adapter_bytes": adapter_bytes,
                 "held_as": held_as, "load_s": load_s,
                 "kv_bytes": kv_bytes, "resident_jobs": len(cache.resident()), "loaded_vmhwm": loaded_vmhwm,
                 "serving_vmhwm": serving_vmhwm, "vmhwm": max(loaded_vmhwm, serving_vmhwm)})


CHILDREN = {"floor": child_floor, "merged": child_merged, "generate": child_generate, "engine": child_engine}


OMP_WAIT_POLICY = "PASSIVE"


def spawn(spec: dict) -> dict:
    """Run one child (this file, --child) in a fresh process; its RESULT line."""
    log(f"child {spec['kind']} {dict((k, v) for k, v in spec.items() if k != 'kind')}")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false",
                               **({"OMP_WAIT_POLICY": OMP_WAIT_POLICY} if OMP_WAIT_POLICY else {})})
    if proc.returncode:
        raise RuntimeError(f"child {spec} exited {proc.returncode}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    result["child_s"] = round(time.perf_counter() - started, 1)
    return result


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> None:
    global OMP_WAIT_POLICY
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 and 16 jobs, concurrency 1 and 8, fewer requests")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="job methods (default full lora)")
    ap.add_argument("--jobs", type=int, nargs="+", default=None, help="full job counts (default 1 4 16; --quick 1 16)")
    ap.add_argument("--lora-jobs", type=int, nargs="+", default=None,
                    help="LoRA job counts (default 1 16: loading a LoRA job factors it, ~5 s each here)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=None,
                    help="requests in flight (default 1 8 32; --quick 1 8)")
    ap.add_argument("--tokens", type=int, default=64, help="greedy output tokens per request")
    ap.add_argument("--merged-jobs", type=int, default=16, help="merged models in (a)")
    ap.add_argument("--omp-wait-policy", default=OMP_WAIT_POLICY, help="for every child; '' leaves it unset")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "serving.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        return CHILDREN[spec["kind"]](spec)
    OMP_WAIT_POLICY = args.omp_wait_policy

    methods = [m for m in METHODS if m in args.methods]
    job_counts = {"full": args.jobs or ([1, 16] if args.quick else [1, 4, 16]), "lora": args.lora_jobs or [1, 16]}
    concurrency = args.concurrency or ([1, 8] if args.quick else [1, 8, 32])
    cells = [(c, requests_for(c, args.quick)) for c in concurrency]
    total = time.perf_counter()
    floor = spawn({"kind": "floor"})
    gens = {m: spawn({"kind": "generate", "method": m, "requests": requests_for(1, args.quick), "tokens": args.tokens})
            for m in methods}
    merged = spawn({"kind": "merged", "method": "full", "jobs": args.merged_jobs})
    engines = {(m, j): spawn({"kind": "engine", "method": m, "jobs": j, "cells": cells, "tokens": args.tokens,
                              "keep_outputs": j == 1})
               for m in methods for j in job_counts[m]}
    total = time.perf_counter() - total

    net = lambda r: r["vmhwm"] - floor["vmhwm"]  # noqa: E731
    gib = lambda b: b / 2**30  # noqa: E731
    mib = lambda b: b / 2**20  # noqa: E731
    rows = [c for (m, j), r in engines.items() for c in r["cells"]]
    by = {(c["method"], c["jobs"], c["concurrency"]): c for c in rows}
    first = next(iter(engines.values()))

    print(f"\nbase: {first['base_bytes'] / 4e6:.0f} M parameters, fp32; plan {PLAN}; {args.tokens} greedy "
          f"tokens a request; prompts {PROMPT_LENGTHS[0]}..{PROMPT_LENGTHS[1]} tokens; {os.cpu_count()} CPUs, "
          f"{THREADS} torch threads")
    for m in methods:
        r = next(r for (m_, _), r in engines.items() if m_ == m)
        h = r["held_as"]
        what = (f"{h['blocks']} dense blocks of its own" if m == "full" else
                f"blocks {{}} (none of its own), {h['deltas']} low-rank deltas of rank {'/'.join(map(str, h['delta_ranks']))} "
                f"on the base's linears")
        print(f"{m} job as the engine holds it: {what}; {mib(r['adapter_bytes']):.1f} MiB a job")
    print()
    head = (f"{'approach':13} {'jobs':>4} {'conc':>4} {'N':>3} {'tok/s':>7} {'x (b)':>6} {'x 1job':>6} {'TTFT p50':>9} "
            f"{'p99':>7} {'TPOT p50':>9} {'p99':>7} {'batch':>5} {'wall s':>7} {'others':>6}")
    print(head)
    print("-" * len(head))

    def line(name, jobs_, conc, r, g, one=None):
        ratio = f"{r['tok_s'] / one['tok_s']:6.2f}" if one else f"{'':6}"
        batch = f"{r['mean_batch']:5.1f}" if "mean_batch" in r else f"{1:5d}"
        print(f"{name:13} {jobs_:>4} {conc:>4} {r['requests']:>3} {r['tok_s']:7.1f} {r['tok_s'] / g['tok_s']:6.2f} {ratio} "
              f"{r['ttft_p50'] * 1e3:7.0f}ms {r['ttft_p99'] * 1e3:5.0f}ms {r['tpot_p50'] * 1e3:7.0f}ms "
              f"{r['tpot_p99'] * 1e3:5.0f}ms {batch} {r['wall_s']:7.1f} {r['other_cpu_share'] * 100:5.0f}%")

    for m in methods:
        g = gens[m]
        line(f"generate {m}", 1, 1, g, g)
        for c in rows:
            if c["method"] == m:
                one = by.get((m, 1, c["concurrency"])) if c["jobs"] != 1 else None
                line(f"engine {m}", c["jobs"], c["concurrency"], c, g, one)
    print("(x (b): throughput / generate's on a merged model of the same method; x 1job: / the same cell with every "
          "request on one job of that method; batch: mean rows per decode step; others: CPU share other processes took)")

    bigs = {m: max(job_counts[m]) for m in methods}
    print(f"\nmemory (peak RSS = VmHWM; net = minus the {gib(floor['vmhwm']):.2f} GiB every process pays for torch and "
          f"transformers)")
    print(f"{'approach':34} {'peak RSS':>9} {'net':>9} {'bytes held':>11}")
    for (m, j), r in engines.items():
        held = r["base_bytes"] + j * r["adapter_bytes"] + r["kv_bytes"]
        print(f"{'engine ' + m + ', ' + str(j) + ' jobs':34} {gib(r['vmhwm']):8.2f}G {gib(net(r)):8.2f}G {gib(held):10.2f}G  "
              f"(base {gib(r['base_bytes']):.2f} + {j} x adapter {gib(r['adapter_bytes']):.4f} + KV {gib(r['kv_bytes']):.2f}); "
              f"peak while loading {gib(r['loaded_vmhwm']):.2f}G, while serving {gib(r['serving_vmhwm']):.2f}G; "
              f"loaded in {r['load_s']:.1f} s")
    print(f"{'(a) ' + str(merged['models']) + ' merged models':34} {gib(merged['vmhwm']):8.2f}G {gib(net(merged)):8.2f}G "
          f"{gib(merged['param_bytes']):10.2f}G  (parameters and buffers; a merged LoRA model has the same bytes)")
    for m in methods:
        g = gens[m]
        print(f"{'(b) generate ' + m + ', one merged model':34} {gib(g['vmhwm']):8.2f}G {gib(net(g)):8.2f}G "
              f"{gib(g['base_bytes']):10.2f}G")
    for m in methods:
        e = engines[(m, bigs[m])]
        exact = (e["base_bytes"] + bigs[m] * e["adapter_bytes"] + e["kv_bytes"]) / merged["param_bytes"]
        print(f"engine {m} ({bigs[m]} jobs) / (a): peak RSS {e['vmhwm'] / merged['vmhwm']:.2f}, net {net(e) / net(merged):.2f}; "
              f"from bytes alone {exact:.2f}")

    matches = {}
    for m in methods:
        if (m, 1) in engines and any("outputs" in c for c in engines[(m, 1)]["cells"]):
            mine = next(c["outputs"] for c in engines[(m, 1)]["cells"] if "outputs" in c)
            k = min(len(mine), len(gens[m]["outputs"]))
            same = sum(a == b for a, b in zip(mine[:k], gens[m]["outputs"][:k]))
            matches[m] = {"identical": same, "of": k}
            print(f"greedy tokens, engine ({m}, 1 job, concurrency 1) vs generate on job 0's merged model: "
                  f"{same} of {k} requests identical")

    aims = {}
    for m in methods:
        g, big = gens[m], bigs[m]
        e = engines[(m, big)]
        bound = g["vmhwm"] + big * e["adapter_bytes"] + e["kv_bytes"]
        exact = (e["base_bytes"] + big * e["adapter_bytes"] + e["kv_bytes"]) / merged["param_bytes"]
        aims[f"{m}_memory_{big}_jobs"] = {
            "aim": f"{m}: engine peak RSS ({big} jobs) <= (b)'s peak RSS + {big} x adapter + KV",
            "vmhwm": e["vmhwm"], "bound_bytes": bound, "ratio_to_bound": round(e["vmhwm"] / bound, 3),
            "ratio_to_merged_net": round(net(e) / net(merged), 3), "ratio_to_merged_rss": round(e["vmhwm"] / merged["vmhwm"], 3),
            "exact_bytes_ratio_to_merged": round(exact, 3), "pass": e["vmhwm"] <= bound}
        for c in concurrency:
            if c > 1 and (m, big, c) in by and (m, 1, c) in by and big > 1:
                ratio = by[(m, big, c)]["tok_s"] / by[(m, 1, c)]["tok_s"]
                aims[f"{m}_mixed_throughput_c{c}"] = {"aim": f"{m}: {big} jobs >= 0.8 x one job, concurrency {c}",
                                                     "ratio": round(ratio, 3), "pass": ratio >= 0.8}
        c8 = 8 if (m, big, 8) in by else max(c for c in concurrency if (m, big, c) in by)
        ratio = by[(m, big, c8)]["tok_s"] / g["tok_s"]
        aims[f"{m}_vs_generate_c{c8}"] = {"aim": f"{m}: {big} jobs at concurrency {c8} >= 3 x generate one at a time",
                                         "ratio": round(ratio, 3), "pass": ratio >= 3}
    print("\naims:")
    for name, a in aims.items():
        value = a.get("ratio", a.get("ratio_to_bound"))
        print(f"  {verdict(a['pass'])}  {a['aim']}: {value:.2f}" + (
            f" of the bound ({gib(a['vmhwm']):.2f} of {gib(a['bound_bytes']):.2f} GiB)" if "_memory_" in name else "x"))
    measured = [*gens.values(), *rows]
    shared = [r for r in measured if r["other_cpu_share"] > 0.10]
    if shared:
        print(f"WARNING: other processes took over 10% of the CPUs during {len(shared)} measurements (column 'others')")
    print(f"total {total:.0f} s")

    for r in measured:
        r.pop("outputs", None)
    rounded = lambda d: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}  # noqa: E731
    results = {"machine": f"{os.cpu_count()} CPUs, {THREADS} torch threads", "omp_wait_policy": OMP_WAIT_POLICY or None,
               "quick": args.quick, "shape": SHAPE, "plan": PLAN, "tokens": args.tokens,
               "prompt_lengths": list(PROMPT_LENGTHS), "methods": methods, "noise": NOISE,
               "lora": {"rank": LORA_RANK, "r": LORA_R, "change_norm_ratio": LORA_CHANGE},
               "params": first["base_bytes"] // 4,
               "held_as": {m: next(r["held_as"] for (m_, _), r in engines.items() if m_ == m) for m in methods},
               "cells": [rounded(c) for c in rows],
               "generate": {m: rounded(g) for m, g in gens.items()},
               "memory": {"floor_vmhwm": floor["vmhwm"],
                          "engine": {m: {j: {"vmhwm": r["vmhwm"], "net": net(r), "rss_anon_end": r["rss_anon"],
                                             "base_bytes": r["base_bytes"], "adapter_bytes": r["adapter_bytes"],
                                             "kv_bytes": r["kv_bytes"], "load_s": round(r["load_s"], 2),
                                             "loaded_vmhwm": r["loaded_vmhwm"], "serving_vmhwm": r["serving_vmhwm"]}
                                         for (m_, j), r in engines.items() if m_ == m} for m in methods},
                          "merged": {"models": merged["models"], "vmhwm": merged["vmhwm"], "net": net(merged),
                                     "param_bytes": merged["param_bytes"]},
                          "generate": {m: {"vmhwm": g["vmhwm"], "net": net(g), "param_bytes": g["base_bytes"]}
                                       for m, g in gens.items()}},
               "greedy_matches_generate": matches, "aims": aims, "total_s": round(total, 1)}
    Path(args.results).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
