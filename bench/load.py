"""Load on one coordinator: N enrolled clients, two jobs at once, 50 clients sampled per round.

One real `offsite cloud serve` process; the clients are lightweight (no training: each waits a moment
and sends a real sealed LoRA update of its job's shape) but otherwise real: each enrolls with its own
token, holds its own mutual-TLS channel with its own certificate, asks GetTask without a job id (the
coordinator walks the jobs it is on), and uploads through BeginUpload / UploadChunks. Many clients share
one agent process (asyncio, one channel each).

Reported per (database, N): rounds per minute, p99 of a client's connection (TCP and TLS handshake, before
its first call: all N connect at once), p50 / p99 latency of GetTask as the clients see it and the
coordinator's own p99 of it (its offsite_call_seconds histogram, from call start to reply: a bucket bound),
p50 / p99 of an upload (BeginUpload to the accepted result), the coordinator's peak RSS and open file descriptors (sampled from /proc), and
the checks: every update a selected client sent before its round closed was accepted, every round closed
once with clients_per_round updates, nothing was rejected. Ratios between N are printed side by side.

    python bench/load.py [--clients 100 300 1000] [--db sqlite postgresql] [--rounds 3]

PostgreSQL runs on a throwaway server started from the machine's binaries (offsite.demo.postgres).
Results: bench/results/load.json.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "load.json"
PER_ROUND = 50
JOBS = ("load-a", "load-b")


def server_p99(http_port: int, method: str) -> float:
    """The coordinator's own p99 for `method` (offsite_call_seconds, from its start to its reply): the upper
    bound of the first histogram bucket that holds 99% of the calls."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    text = urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=30).read().decode()
    buckets = sorted((float(s.labels["le"]), s.value) for f in text_string_to_metric_families(text)
                     if f.name == "offsite_call_seconds" for s in f.samples
                     if s.name.endswith("_bucket") and s.labels["method"] == method)
    return next(le for le, count in buckets if count >= 0.99 * buckets[-1][1])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- one agent process: many lightweight clients ------------------------------------------------------

async def _client(name: str, args, templates: dict, out: dict) -> None:
    import grpc

    from offsite.client.identity import load_identity
    from offsite.protos.offsite.v1 import coordinator_pb2 as pb
    from offsite.protos.offsite.v1 import coordinator_pb2_grpc as pb_grpc
    from offsite.sealing import SealContext, seal
    from offsite.transport import CHANNEL_OPTIONS

    me = load_identity(Path(args.workdir) / name)
    creds = grpc.ssl_channel_credentials(Path(args.ca).read_bytes(), me.tls_key_pem, me.certificate_pem)
    async with grpc.aio.secure_channel(f"localhost:{args.port}", creds, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        started = time.perf_counter()
        await channel.channel_ready()  # connection and TLS handshake, timed apart: 1000 of them at once are a herd
        out["connect_s"].append(time.perf_counter() - started)
        while True:
            started = time.perf_counter()
            try:
                task = await stub.GetTask(pb.GetTaskRequest(), timeout=30)
            except grpc.aio.AioRpcError as e:
                out["errors"][f"GetTask {e.code().name}"] = out["errors"].get(f"GetTask {e.code().name}", 0) + 1
                await asyncio.sleep(1.0)
                continue
            out["get_task_s"].append(time.perf_counter() - started)
            if task.kind == pb.Task.DONE:
                return
            if task.kind == pb.Task.WAIT:
                await asyncio.sleep(task.retry_after_s * random.uniform(0.8, 1.2))
                continue
            await asyncio.sleep(random.uniform(0.5, 1.5))  # "training"
            payload, digest = templates[task.job_id]
            envelope = bytes(seal(payload, SealContext(task.job_id, task.round, me.client_id, digest), me.coordinator_key,
                                  me.signing_key))
            started = time.perf_counter()
            try:
                header = pb.UploadHeader(job_id=task.job_id, round=task.round, num_examples=10, size=len(envelope),
                                         sha256=hashlib.sha256(envelope).hexdigest())
                session = await stub.BeginUpload(header, timeout=30)
                step = session.chunk_size

                async def parts():
                    for offset in range(session.offset, len(envelope), step):
                        yield pb.UploadPart(upload_id=session.upload_id, offset=offset, data=envelope[offset:offset + step])
                result = await stub.UploadChunks(parts(), timeout=60)
                if result.accepted:
                    out["upload_s"].append(time.perf_counter() - started)
                    out["accepted"] += 1
            except grpc.aio.AioRpcError as e:
                key = "late" if e.code() == grpc.StatusCode.FAILED_PRECONDITION else f"upload {e.code().name}"
                out["errors"][key] = out["errors"].get(key, 0) + 1


async def _agents(names: list[str], args) -> dict:
    templates = {job_id: (Path(path).read_bytes(), digest)  # each job's update, as the driver serialized it
                 for job_id, (path, digest) in json.loads(Path(args.templates).read_text()).items()}
    out = {"connect_s": [], "get_task_s": [], "upload_s": [], "accepted": 0, "errors": {}}
    await asyncio.gather(*(_client(n, args, templates, out) for n in names))
    return out


def agent_main(args) -> None:
    """Enroll each named client (sequentially, with the real client's code), then run them all at once."""
    import grpc

    from offsite.client.identity import enroll, load_identity
    from offsite.protos.offsite.v1 import coordinator_pb2_grpc as pb_grpc
    from offsite.transport import secure_channel

    names = args.names.split(",")
    with secure_channel(f"localhost:{args.enroll_port}", args.ca) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        for name in names:
            if load_identity(Path(args.workdir) / name) is None:
                token = (Path(args.tokens) / f"{name}.token").read_text().strip()
                for attempt in range(20):
                    try:
                        enroll(stub, token, Path(args.workdir) / name)
                        break
                    except grpc.RpcError as e:
                        if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == 19:
                            raise
                        time.sleep(0.5)
    Path(args.ready).write_text("ready")
    while not Path(args.go).exists():  # every agent has enrolled its clients: start together
        time.sleep(0.05)
    out = asyncio.run(_agents(names, args))
    Path(args.out).write_text(json.dumps(out))


# --- the driver -------------------------------------------------------------------------------------

class Sampler:
    """Peak RSS and open file descriptors of a process, from /proc every 0.25 s."""

    def __init__(self, pid: int):
        self.pid, self.rss, self.fds = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.rss = max(self.rss, int(line.split()[1]) * 1024)
                self.fds = max(self.fds, len(os.listdir(f"/proc/{self.pid}/fd")))
            except OSError:
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def judge(rows: list[dict]) -> dict[str, bool]:
    """The issue's aims over the rows of one run."""
    largest = [r for r in rows if r["clients"] == max(r["clients"] for r in rows)]
    return {"p99 GetTask as the clients see it under 200 ms at the largest N": all(r["get_task_p99_ms"] < 200 for r in largest),
            "p99 GetTask in the coordinator at most 200 ms at the largest N": all(
                r["get_task_p99_in_coordinator_ms_at_most"] <= 200 for r in largest),
            "coordinator memory flat in N (<= 1.2x)": all(
                r["coordinator_peak_rss_mib"] <= 1.2 * next(f for f in rows if f["database"] == r["database"])[
                    "coordinator_peak_rss_mib"] for r in rows),
            "every check passed": all(all(r["checks"].values()) for r in rows)}


def _on(cpus: set[int]):
    """A preexec_fn that keeps the child on `cpus`."""
    return lambda: os.sched_setaffinity(0, cpus)


def _offsite(*args: str) -> list[str]:
    return [sys.executable, "-m", "offsite.cli", *args]


def run_load(n: int, db_url: str | None, rounds: int, per_process: int, tmp: Path, pin: bool = False) -> dict:
    import torch

    from offsite.cloud.coordinator import Coordinator
    from offsite.cloud.identity import StateLayout, init_state
    from offsite.cloud.job import JobConfig
    from offsite.demo.tiny import make_tiny_model
    from offsite.tensors import to_bytes

    names = [f"c{i:04d}" for i in range(n)]
    cpus = sorted(os.sched_getaffinity(0))
    coordinator_cpus, agent_cpus = set(cpus[:len(cpus) // 2]), set(cpus[len(cpus) // 2:])
    state = tmp / "state"
    init_state(state, names, ["localhost", "127.0.0.1"], 3600, db_url)
    base = make_tiny_model(tmp / "base")
    coordinator = Coordinator.open(state)
    templates = {}
    for i, job_id in enumerate(JOBS):
        coordinator.create_job(JobConfig(job_id=job_id, base_model=str(base), emulator_layers=1, method="lora",
                                         method_params={"r": 4}, rounds=rounds, clients_per_round=PER_ROUND, seed=i,
                                         heartbeat_s=10.0))
        art = coordinator.job(job_id).artifacts
        update = {k: torch.randn(shape, generator=torch.Generator().manual_seed(i)).to(getattr(torch, dtype)) * 1e-3
                  for k, (shape, dtype) in art.update_spec.items()}
        path = tmp / f"{job_id}.update"
        path.write_bytes(to_bytes(update))
        templates[job_id] = (str(path), art.skeleton_digest)
    (tmp / "templates.json").write_text(json.dumps(templates))
    del coordinator
    env = {**os.environ, **({"OFFSITE_DB_URL": db_url} if db_url else {})}
    server = subprocess.Popen(_offsite("cloud", "serve", "--state", str(state), "--address", "127.0.0.1:0",
                                       "--port-file", str(tmp / "ports"), "--http-address", "127.0.0.1:0"),
                              env=env, stderr=open(tmp / "server.log", "w"), preexec_fn=_on(coordinator_cpus) if pin else None)
    try:
        while not (tmp / "ports").exists():
            if server.poll() is not None:
                raise RuntimeError(f"coordinator exited: {(tmp / 'server.log').read_text()[-2000:]}")
            time.sleep(0.1)
        ports = json.loads((tmp / "ports").read_text())
        sampler = Sampler(server.pid)
        groups = [names[i:i + per_process] for i in range(0, n, per_process)]
        agents = []
        for g, group in enumerate(groups):
            agents.append(subprocess.Popen(
                [sys.executable, __file__, "--agent", "--names", ",".join(group), "--workdir", str(tmp / "clients"),
                 "--tokens", str(state / "tokens"), "--ca", str(state / "tls" / "ca.pem"), "--port", str(ports["port"]),
                 "--enroll-port", str(ports["enroll_port"]), "--templates", str(tmp / "templates.json"),
                 "--ready", str(tmp / f"ready-{g}"), "--go", str(tmp / "go"), "--out", str(tmp / f"agent-{g}.json")],
                stderr=open(tmp / f"agent-{g}.log", "w"), preexec_fn=_on(agent_cpus) if pin else None))
        while not all((tmp / f"ready-{g}").exists() for g in range(len(groups))):
            if any(a.poll() not in (None, 0) for a in agents):
                raise RuntimeError(f"an agent failed: {(tmp / 'agent-0.log').read_text()[-2000:]}")
            time.sleep(0.2)
        started = time.time()
        (tmp / "go").write_text("go")
        for a in agents:
            if a.wait(timeout=3600) != 0:
                raise RuntimeError(f"an agent failed: {(tmp / 'agent-0.log').read_text()[-2000:]}")
        wall = time.time() - started  # every client was told its jobs are over
        served = server_p99(ports["http_port"], "GetTask")
        server.terminate()
        if server.wait(timeout=120) != 0:
            raise RuntimeError(f"coordinator failed: {(tmp / 'server.log').read_text()[-2000:]}")
        sampler.stop()
    finally:
        server.kill()
    outs = [json.loads((tmp / f"agent-{g}.json").read_text()) for g in range(len(groups))]
    get_task = [x for o in outs for x in o["get_task_s"]]
    connect = [x for o in outs for x in o["connect_s"]]
    uploads = [x for o in outs for x in o["upload_s"]]
    errors: dict[str, int] = {}
    for o in outs:
        for k, v in o["errors"].items():
            errors[k] = errors.get(k, 0) + v
    after = StateLayout(state).open_state()  # the database `init` recorded
    closes, per_round, rejected = 0, [], 0
    first_open, last_close = float("inf"), 0.0
    for job_id in JOBS:
        for r in after.rounds(job_id):
            if r.status == "closed":
                closes += 1
                first_open, last_close = min(first_open, r.opened_at), max(last_close, r.closed_at)
            per_round.append(len(after.updates(job_id, r.round)))
        rejected += len(after.rejections(job_id))
    accepted = sum(o["accepted"] for o in outs)
    return {
        "clients": n, "database": "postgresql" if db_url else "sqlite", "pinned": pin, "jobs": len(JOBS), "per_round": PER_ROUND,
        "rounds_closed": closes, "rounds_per_minute": round(closes / max(last_close - first_open, 1e-9) * 60, 2),
        "wall_s": round(wall, 1), "connect_p50_ms": round(statistics.median(connect) * 1e3, 1),
        "connect_p99_ms": round(percentile(connect, 0.99) * 1e3, 1), "get_task_calls": len(get_task),
        "get_task_p50_ms": round(statistics.median(get_task) * 1e3, 1), "get_task_p99_ms": round(percentile(get_task, 0.99) * 1e3, 1),
        "get_task_p99_in_coordinator_ms_at_most": round(served * 1e3, 1),
        "upload_p50_ms": round(statistics.median(uploads) * 1e3, 1), "upload_p99_ms": round(percentile(uploads, 0.99) * 1e3, 1),
        "coordinator_peak_rss_mib": round(sampler.rss / 2**20, 1), "coordinator_peak_fds": sampler.fds,
        "accepted": accepted, "updates_per_round": sorted(set(per_round)), "rejected": rejected, "client_errors": errors,
        "checks": {
            "every_round_closed_once_with_clients_per_round": closes == len(JOBS) * rounds and set(per_round) == {PER_ROUND},
            "every_accepted_upload_counted_once": accepted == sum(per_round),
            "nothing_rejected": rejected == 0 and not any(k != "late" for k in errors),
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 300, 1000])
    ap.add_argument("--db", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-process", type=int, default=250, help="clients per agent process")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--pin", action="store_true", help="the coordinator on half the CPUs, the client agents on the other "
                    "half: what the clients' own load adds to the latency they see")
    for flag in ("--names", "--workdir", "--tokens", "--ca", "--port", "--enroll-port", "--templates", "--ready", "--go"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    ap.add_argument("--agent", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.agent:
        agent_main(args)
        return
    rows = []
    for db in args.db:
        server = None
        if db == "postgresql":
            from offsite.demo import postgres
            why = postgres.unavailable()
            if why:
                print(f"skipping PostgreSQL: {why}")
                continue
            server = postgres.Server(port=55434)  # not the test suite's port
        try:
            for n in args.clients:
                with tempfile.TemporaryDirectory(prefix="offsite-load-") as tmp:
                    row = run_load(n, server.new_database() if server else None, args.rounds, args.per_process, Path(tmp), args.pin)
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("database", "clients", "rounds_per_minute", "connect_p99_ms", "get_task_p50_ms",
                                                      "get_task_p99_ms", "get_task_p99_in_coordinator_ms_at_most",
                                                      "upload_p50_ms", "upload_p99_ms",
                                                      "coordinator_peak_rss_mib", "coordinator_peak_fds", "checks")}),
                      flush=True)
        finally:
            if server:
                server.stop()
    print(f"\n{'db':<11}{'N':>6}{'rounds/min':>12}{'connect p99':>13}{'GetTask p50':>13}{'p99 (ms)':>10}{'in coord.':>11}"
          f"{'upload p50':>12}{'p99 (ms)':>10}{'RSS MiB':>9}{'fds':>6}{'RSS vs N=first':>16}")
    for row in rows:
        first = next(r for r in rows if r["database"] == row["database"])
        print(f"{row['database']:<11}{row['clients']:>6}{row['rounds_per_minute']:>12}{row['connect_p99_ms']:>13}"
              f"{row['get_task_p50_ms']:>13}{row['get_task_p99_ms']:>10}{'<=' + str(row['get_task_p99_in_coordinator_ms_at_most']):>11}"
              f"{row['upload_p50_ms']:>12}{row['upload_p99_ms']:>10}"
              f"{row['coordinator_peak_rss_mib']:>9}{row['coordinator_peak_fds']:>6}"
              f"{row['coordinator_peak_rss_mib'] / first['coordinator_peak_rss_mib']:>15.2f}x")
    aims = judge(rows)
    for aim, ok in aims.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {aim}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": f"{os.cpu_count()} cores", "rows": rows, "aims": aims}, indent=2) + "\n")


if __name__ == "__main__":
    main()
