"""Drive the demo: base model, client data, then the coordinator and three clients as real processes
over TLS, then the central baseline, the report and its checks."""
from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from offsite import lm
from offsite.demo import domain
from offsite.demo.base import BaseConfig, prepare_base
from offsite.demo.central import central_finetune
from offsite.demo.corpus import general_corpus
from offsite.demo.report import checks, format_table
from offsite.files import atomic_write, write_json
from offsite.textdata import read_texts


@dataclass(frozen=True)
class DemoSettings:
    clients: int = 3
    rounds: int = 3
    n_train: int = 1000        # records per client
    n_heldout: int = 200
    main_share: float = 0.8    # non-IID: share of each client's data from its main kind of bulletin
    epochs: float = 1.0        # local epochs per round
    lr: float = 3e-3
    batch_size: int = 16
    max_length: int = 256
    central_lr: float = 1e-3
    # The emulator and what the adapter trains, chosen from the frontier of bench/emulator_strategies.py (README):
    emulator_layers: int = 1   # middle blocks the emulator keeps of the base's 4
    distill_steps: int = 0     # emulator distillation on the general corpus (0: none)
    train_extra: tuple[str, ...] = ("norm", "head")   # beyond the adapter blocks (the base ties head and embeddings)
    lr_schedule: str = "round"          # "job": one warmup and cosine decay over all rounds
    prox_mu: float = 0.0                # FedProx's proximal weight on the clients
    seed: int = 0
    secure_aggregation: bool = False   # the coordinator learns only the sum of the clients' changes
    dp_noise: float = 0.0      # DP-FedAvg noise multiplier (0: no DP)
    dp_clip: float = 1.0       # DP-FedAvg clip bound on each client's change (used when dp_noise > 0)
    base: BaseConfig = field(default_factory=BaseConfig)


def _offsite(*args: str) -> list[str]:
    return [sys.executable, "-m", "offsite.cli", *args]


def _job_toml(s: DemoSettings, base_dir: Path, data: Path, export_dir: Path) -> str:
    sets = ", ".join(f'"client-{i + 1}" = "{data / f"client-{i + 1}" / "heldout.jsonl"}"' for i in range(s.clients))
    tasks = ", ".join(f'"client-{i + 1}" = "{data / f"client-{i + 1}" / "heldout_task.jsonl"}"' for i in range(s.clients))
    return f"""# The demo's job: adapter = bottom 2 + top 2 blocks and the final norm and LM head (tied to the
# embeddings); the emulator keeps {s.emulator_layers} of the 4 middle blocks, distilled {s.distill_steps} steps. Chosen from
# bench/emulator_strategies.py's frontier (see the README): the most utility that keeps the emulator alone
# at least 0.10 nats worse than the full model on general text.
[job]
id = "demo"
base_model = "{base_dir}"
rounds = {s.rounds}
clients_per_round = {s.clients}

[split]
bottom = 2
top = 2
emulator_layers = {s.emulator_layers}
distill_data = "{data / 'general_train.jsonl'}"   # the model owner's general text
distill_steps = {s.distill_steps}
distill_lr = 1e-4
train_extra = {json.dumps(list(s.train_extra))}

[training]
epochs = {s.epochs}
lr = {s.lr}
batch_size = {s.batch_size}
max_length = {s.max_length}
seed = {s.seed}
lr_schedule = "{s.lr_schedule}"
prox_mu = {s.prox_mu}

{_privacy_toml(s)}[eval]
# Held-out sets the model owner evaluates the plug-in on (in this demo the data owners lend them).
sets = {{ {sets} }}
# Held-out match bulletins cut before their result, which the score determines: exact match of greedy decoding.
tasks = {{ {tasks} }}
protection_data = "{data / 'general_heldout.jsonl'}"
export_dir = "{export_dir}"
"""


def _privacy_toml(s: DemoSettings) -> str:
    if not (s.secure_aggregation or s.dp_noise):
        return ""
    lines = ["[privacy]"] + (["secure_aggregation = true"] if s.secure_aggregation else [])
    lines += [f"clip = {s.dp_clip}", f"noise = {s.dp_noise}"] if s.dp_noise else []
    return "\n".join(lines) + "\n\n"


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"coordinator did not start (exit code {proc.poll()})")
        time.sleep(0.2)


def prepare(out: Path, s: DemoSettings) -> tuple[Path, list[Path]]:
    """Everything a run starts from: the base model (cached), each client's data, the general corpus and
    out/job.toml. Returns the base folder and the client data folders."""
    base_dir = prepare_base(out / "base", s.base)
    for sub in ("cloud", "clients", "data", "logs", "export", "dp-sweep"):
        shutil.rmtree(out / sub, ignore_errors=True)
    data = out / "data"
    folders = domain.write_clients(data, s.clients, s.n_train, s.n_heldout, s.main_share, s.seed)
    general_train, general_held = general_corpus()
    domain.write_jsonl(data / "general_train.jsonl", general_train)
    domain.write_jsonl(data / "general_heldout.jsonl", general_held)
    atomic_write(out / "job.toml", _job_toml(s, base_dir, data, out / "export").encode())
    return base_dir, folders


def federate(out: Path, job_toml: Path, folders: list[Path]) -> tuple[dict, float] | None:
    """The system itself: a coordinator (state in out/cloud) and one process per client over mutual TLS.
    Returns the job's report and the seconds from serving to done, or None if a process failed."""
    state, logs = out / "cloud", out / "logs"
    logs.mkdir(parents=True)
    names = [f.name for f in folders]
    subprocess.run(_offsite("cloud", "init", "--state", str(state), "--clients", ",".join(names)), check=True)
    subprocess.run(_offsite("cloud", "jobs", "create", "--state", str(state), "--config", str(job_toml)), check=True)
    started = time.perf_counter()
    server = subprocess.Popen(_offsite("cloud", "serve", "--state", str(state), "--address", "127.0.0.1:0",
                                       "--http-address", "127.0.0.1:0", "--port-file", str(state / "port"), "--exit-when-done"))
    _wait_for(state / "port", server, 60)
    ports = json.loads((state / "port").read_text())
    clients = []
    for folder in folders:
        log = open(logs / f"{folder.name}.log", "w")
        cmd = _offsite("client", "run", "--server", f"localhost:{ports['port']}", "--enroll-server",
                       f"localhost:{ports['enroll_port']}", "--ca", str(state / "tls" / "ca.pem"),
                       "--workdir", str(out / "clients" / folder.name), "--data", str(folder / "train.jsonl"),
                       "--heldout", str(folder / "heldout.jsonl"), "--token-file", str(state / "tokens" / f"{folder.name}.token"),
                       "--threads", "1")
        clients.append((folder.name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    print(f"demo: coordinator on localhost:{ports['port']} (mutual TLS; enrollment on {ports['enroll_port']}); "
          f"{len(clients)} clients training; logs in {logs}; status page http://127.0.0.1:{ports['http_port']}/")
    failed = []
    for name, proc, log in clients:
        if proc.wait() != 0:
            failed.append(name)
        log.close()
    if server.wait(timeout=900) != 0 or failed:
        print(f"demo: a process failed (clients {failed}, coordinator exit {server.returncode}); see {logs}")
        return None
    return json.loads((state / "jobs" / "demo" / "report.json").read_text()), time.perf_counter() - started


def dp_sweep(out: Path, s: DemoSettings, base_dir: Path, folders: list[Path], noises: list[float]) -> list[dict] | None:
    """The same job again under DP-FedAvg at each noise multiplier: what each epsilon costs in plug-in loss."""
    rows = []
    for z in noises:
        run = out / "dp-sweep" / f"noise-{z:g}"
        run.mkdir(parents=True)
        job = run / "job.toml"
        atomic_write(job, _job_toml(replace(s, dp_noise=z), base_dir, out / "data", run / "export").encode())
        done = federate(run, job, folders)
        if done is None:
            return None
        dp = done[0]["privacy"]
        rows.append({"noise": z, "clip": dp["clip"], "epsilon": dp["epsilon"], "delta": dp["delta"],
                     "plug_in": done[0]["eval"]["all"]["plug_in"]})
        print(f"demo: DP-FedAvg noise {z:g}: plug-in {rows[-1]['plug_in']:.3f}, epsilon {dp['epsilon']:.3g}")
    return rows


def run_demo(out: Path, s: DemoSettings, dp_noises: list[float] = ()) -> bool:
    out = out.resolve()
    base_dir, folders = prepare(out, s)
    done = federate(out, out / "job.toml", folders)
    if done is None:
        return False
    report, federated_s = done
    central = central_finetune(str(base_dir), [f / "train.jsonl" for f in folders],
                               {f.name: f / "heldout.jsonl" for f in folders},
                               epochs=s.epochs * s.rounds, lr=s.central_lr, batch_size=s.batch_size,
                               max_length=s.max_length, seed=s.seed, task_files={f.name: f / "heldout_task.jsonl" for f in folders})
    for name, loss in central.loss.items():
        report["eval"][name]["central_full_finetune"] = loss
    for name, accuracy in central.accuracy.items():
        report["task_accuracy"][name]["central_full_finetune"] = accuracy
    a = report["eval"]["all"]
    report["gap_closure"] = round((a["full_zero_shot"] - a["plug_in"]) / (a["full_zero_shot"] - a["central_full_finetune"]), 4)
    report["central_epochs"] = s.epochs * s.rounds
    report["federated_seconds"] = round(federated_s, 1)
    report["export_reload_plug_in"] = reload_check(Path(report["export_dir"]), folders, s.max_length)
    report["served"] = serve_and_ask(out / "cloud", Path(report["export_dir"]), out / "logs")
    if dp_noises:
        report["dp_sweep"] = dp_sweep(out, s, base_dir, folders, list(dp_noises))
        if report["dp_sweep"] is None:
            return False
    write_json(out / "report.json", report)
    print(format_table(report))
    problems = checks(report)
    for p in problems:
        print(f"CHECK FAILED: {p}")
    print(f"report: {out / 'report.json'}; exported model: {report['export_dir']}")
    return not problems


QUESTION = "MATCH Monday: Fairhaven Rangers 4-2 Calder Athletic ("   # the result follows from the score


def _post(url: str, body: dict | None, secret: str, ca: Path) -> dict:
    """One call to the inference API over TLS (the standard library's client; README shows the openai one)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, context=ssl.create_default_context(cafile=str(ca)), timeout=120) as reply:
        return json.loads(reply.read())


def serve_and_ask(state: Path, export_dir: Path, logs: Path, job: str = "demo") -> dict:
    """The last step of Offsite-Tuning: serve the finished job (`offsite cloud infer`), make an API key for
    it, and ask it and its base one question through the OpenAI-compatible API; the served answer must be
    what plain transformers' greedy `generate` gives on the exported model."""
    from offsite.cloud import api_keys
    from offsite.cloud.identity import StateLayout

    layout = StateLayout(state)
    secret, _ = api_keys.create_key(layout.open_state(), [job], label="make demo")
    port_file = state / "infer-port"
    log = open(logs / "infer.log", "w")
    server = subprocess.Popen(_offsite("cloud", "infer", "--state", str(state), "--address", "127.0.0.1:0",
                                       "--port-file", str(port_file)), stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(port_file, server, 120)
        url = f"https://localhost:{json.loads(port_file.read_text())['port']}/v1"
        models = [m["id"] for m in _post(url + "/models", None, secret, layout.ca_cert)["data"]]
        answers = {m: _post(url + "/completions", {"model": m, "prompt": QUESTION, "max_tokens": 24, "temperature": 0},
                            secret, layout.ca_cert)["choices"][0]["text"] for m in models}
    finally:
        server.terminate()
        server.wait(60)
        log.close()
    model = AutoModelForCausalLM.from_pretrained(str(export_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    ids = tokenizer(QUESTION, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
    base = next(m for m in models if m != job)
    served = {"question": QUESTION, "answer": answers[job], "base_model": base, "base_answer": answers[base],
              "matches_export": answers[job] == tokenizer.decode(out, skip_special_tokens=True)}
    print(f"demo: asked the served job through https://localhost/v1/completions: {QUESTION!r}\n"
          f"  fine-tuned job {job!r}: {served['answer']!r}\n  its base {base!r}: {served['base_answer']!r}")
    return served


def reload_check(export_dir: Path, folders: list[Path], max_length: int) -> float:
    """Load the export with plain transformers and measure its loss on all held-out data again."""
    model = AutoModelForCausalLM.from_pretrained(str(export_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    enc = [x for f in folders for x in lm.encode(tokenizer, read_texts(f / "heldout.jsonl"), max_length)]
    return round(lm.mean_token_loss(model, enc, tokenizer.pad_token_id), 4)
