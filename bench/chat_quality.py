"""The demo's task as chat data, on the demo's base (which has no chat template) with a job's own ChatML-like
template: what the plug-in learns of the assistant's answers, federated against central, with the adapter
training LoRA + the final norm + the (tied) head. One run, same base, data, emulator and seeds for every row.

    .venv/bin/python bench/chat_quality.py [--n-train 400] [--n-heldout 100]

On a machine shared with other runs, under nice, give it one thread (OMP_NUM_THREADS=1): measured on 2 cores
beside others' tests, two threads trained 10x slower than one (each waits for the other's time slice).

Data: the demo's match bulletins (offsite.demo.domain) cut into prompt and result (domain.match_results), each
made a conversation as clients would hold it ({"messages": [...]} JSONL): a system turn, the bulletin up to its
result as the user's turn, the result ("home win") as the assistant's. Two clients, each with n_train chats
and n_heldout held out (the model owner scores the union). The template is written into the bundle's tokenizer
as `[job] chat_template` does, and every model here renders chats with it (offsite.render): the loss counts the
assistant's tokens only (its answer and end of turn); exact match greedy-decodes after the served prompt.
Rows (bench/quality.py's machinery; gap_closure as it defines it, against central_full_finetune):
- full_zero_shot, emulator_zero_shot: the base and the emulator alone;
- central_full_finetune (the whole model), central_adapter_on_full (the adapter on the full model itself),
  central_offsite (the adapter through the emulator, plugged in): the pooled chats for rounds x epochs;
- federated: the demo's schedule, 2 clients x rounds, FedAvg of the merged adapters, plugged in
  (bench/emulator_strategies.federate: the system's own trainer, merge and FedAvg, no wire).
The emulator is quality.py's (2 of 4 middle blocks, distilled); the adapter is its lora-16+extra-norm-head row.
Results: bench/results/chat_quality.json, with the markdown table the run prints.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from offsite import render
from offsite.demo import domain
from offsite.demo.run import DemoSettings
from offsite.emulator.build import build
from offsite.emulator.bundle import load_bundle
from offsite.emulator.methods import MethodConfig
from offsite.files import atomic_write, write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from emulator_strategies import demo_inputs, federate, heldout  # noqa: E402  (one setup, one federated schedule)
from quality import ROWS, baselines, emulator_config, gap_closure, scores  # noqa: E402  (one set of baselines)

# ChatML's turns, ended by the demo tokenizer's own EOS (it has no <|im_end|> token; adding one would change the
# base's vocabulary) and opened by its BOS (its pretraining texts all start with <s>, which the template must write).
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SYSTEM = "You read football bulletins. Answer with the result only: home win, away win or draw."
ROW = "lora-16+extra-norm-head"  # quality.py's row: LoRA r=16 in the adapter blocks, the final norm, the tied head
TRAINS = {"full_zero_shot": "nothing", "emulator_zero_shot": "nothing (the emulator alone)",
          "central_full_finetune": "the whole model", "central_adapter_on_full": "LoRA + norm + head, on the full model",
          "central_offsite": "LoRA + norm + head, on the emulator; plugged in",
          "federated": "LoRA + norm + head, on the emulator at 2 clients, FedAvg; plugged in"}


def conversations(n: int, seed: int) -> list[dict]:
    """`n` chats made of the demo's match bulletins: the bulletin up to its result asks, the result answers."""
    r = random.Random(seed)
    return [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt},
                          {"role": "assistant", "content": completion.strip(" ()")}]}
            for prompt, completion in domain.match_results([domain.match(r) for _ in range(n)])]


def write_chat_clients(out: Path, n_clients: int, n_train: int, n_heldout: int, seed: int) -> list[Path]:
    """One folder per client with train.jsonl and heldout.jsonl of chats, cut from one seeded stream."""
    per_client = n_train + n_heldout
    chats = conversations(n_clients * per_client, seed)
    folders = []
    for c in range(n_clients):
        folder, mine = out / f"client-{c + 1}", chats[c * per_client:(c + 1) * per_client]
        for name, part in (("train.jsonl", mine[:n_train]), ("heldout.jsonl", mine[n_train:])):
            atomic_write(folder / name, "".join(json.dumps(x) + "\n" for x in part).encode())
        folders.append(folder)
    return folders


def markdown(rows: dict[str, dict]) -> str:
    lines = ["| row | what trains | held-out loss (assistant tokens) | gap_closure | exact match |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {name} | {TRAINS[name]} | {r['loss']:.3f} | {r['gap_closure']:.3f} | {r['accuracy']:.1%} |"
              for name, r in rows.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=400, help="chats per client")
    parser.add_argument("--n-heldout", type=int, default=100, help="held-out chats per client")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-chat"))
    args = parser.parse_args()
    started = time.perf_counter()
    s, work = dataclasses.replace(DemoSettings(), clients=2), Path(args.work)
    base, _, _, full, _ = demo_inputs(s, work)  # the demo's base and the general corpus the emulator is distilled on
    folders = write_chat_clients(work / "chat", s.clients, args.n_train, args.n_heldout, s.seed)
    options = ROWS[ROW]
    method = MethodConfig(**options["method"])
    bundle = work / "chat-bundle"
    shutil.rmtree(work / f".{bundle.name}.distill", ignore_errors=True)  # a new run distills anew, not from an old checkpoint
    build(str(base), emulator_config(work, options["train_extra"]), bundle, show_progress=False, chat_template=CHAT_TEMPLATE)
    emulator, tokenizer, _ = load_bundle(bundle)  # its tokenizer carries the job's template, as clients get it
    held, tasks = heldout(folders, tokenizer, s.max_length)
    if not all(any(mask) for _, mask in held):  # a chat cut before its answer would score nothing
        raise SystemExit(f"a held-out chat is longer than max_length {s.max_length}: its answer would not be scored")
    example = render.render(tokenizer, tasks[0])  # every held-out chat is scored by exact match too
    learned = tokenizer.decode([i for i, keep in zip(example.ids, example.learned) if keep])
    print(f"a chat as trained: {tokenizer.decode(example.ids)!r}; learned: {learned!r}", flush=True)

    rows = {"full_zero_shot": scores(full, tokenizer, held, tasks), "emulator_zero_shot": scores(emulator, tokenizer, held, tasks)}
    t = time.perf_counter()
    rows.update(baselines(base, bundle, folders, s, held, tasks, method))
    print(f"baselines in {time.perf_counter() - t:.0f} s: {rows}", flush=True)
    t = time.perf_counter()
    fed = federate(base, bundle, folders, s, method=method)
    federated_s = time.perf_counter() - t
    rows["federated"] = {"loss": round(fed["plug_in"], 4), "accuracy": round(fed["plug_in_accuracy"], 4)}
    zero, top = rows["full_zero_shot"]["loss"], rows["central_full_finetune"]["loss"]
    for r in rows.values():
        r["gap_closure"] = gap_closure(zero, top, r["loss"])
    table = markdown(rows)
    answer, count = Counter(e.completion for e in tasks).most_common(1)[0]  # what exact match is worth by guessing
    seconds = time.perf_counter() - started
    print(f"\n{table}\n\nalways answering the commonest held-out result ({answer!r}) scores {count / len(tasks):.1%} exact match")
    print(f"{s.clients} clients x {args.n_train} chats ({args.n_heldout} each held out, {len(tasks)} scored); "
          f"{s.rounds} rounds x {s.epochs:g} local epoch (central: {s.rounds * s.epochs:g} epochs on the pooled chats); "
          f"federated {federated_s:.0f} s, client {fed['client_seconds_per_round']:.1f} s/round, upload "
          f"{fed['upload_bytes']:,} B/round; whole run {seconds:.0f} s on {os.cpu_count()} CPU cores")
    write_json(ROOT / "bench" / "results" / "chat_quality.json", {
        "machine": f"{os.cpu_count()} CPU cores", "seconds": round(seconds), "chat_template": CHAT_TEMPLATE,
        "learned_tokens_of_a_chat": learned, "clients": s.clients, "chats_per_client": args.n_train,
        "heldout_per_client": args.n_heldout, "rounds": s.rounds, "local_epochs": s.epochs, "lr": s.lr,
        "central_lr": s.central_lr, "adapter": options, "federated_seconds": round(federated_s),
        "client_seconds_per_round": round(fed["client_seconds_per_round"], 1), "upload_bytes_per_round": fed["upload_bytes"],
        "emulator_with_adapter_federated": round(fed["emulator_with_adapter"], 4),
        "majority_answer": {"answer": answer, "exact_match": round(count / len(tasks), 4)}, "rows": rows, "table": table.splitlines()})


if __name__ == "__main__":
    main()
