"""`offsite cloud ...`: init, jobs create, serve, status.

What needs torch (the coordinator, the emulator) is imported inside the commands that use it, so `init`,
`clients revoke`, `keys`, `probe` and `--help` answer in a fraction of a second.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from offsite.cloud import api_keys
from offsite.cloud import probe as health_probe
from offsite.cloud.identity import StateLayout, init_state, issue_tokens
from offsite.cloud.limits import Limits
from offsite.emulator.placement import DEVICE_MAPS
from offsite.errors import ConfigError, NotFoundError, shown
from offsite.files import atomic_write
from offsite.transport import CHUNK_BYTES, MAX_MESSAGE_BYTES, enroll_target

log = logging.getLogger("offsite.cloud")


def open_coordinator(state_dir: str, chunk_bytes: int = CHUNK_BYTES, limits: Limits | None = None):
    from offsite.cloud.coordinator import Coordinator

    return Coordinator.open(state_dir, chunk_bytes=chunk_bytes, limits=limits)


def cmd_init(args) -> int:
    names = [n.strip() for n in args.clients.split(",") if n.strip()]
    hosts = args.host or ["localhost", "127.0.0.1"]
    tokens = init_state(args.state, names, hosts, args.token_ttl_hours * 3600, args.db)
    print(f"coordinator state created in {args.state}; CA certificate: {StateLayout(Path(args.state)).ca_cert}")
    for name, path in tokens.items():
        print(f"  enrollment token for {name}: {path}")
    return 0


def cmd_jobs_create(args) -> int:
    from offsite.cloud.job import JobConfig

    coordinator = open_coordinator(args.state)
    cfg = JobConfig.from_toml(args.config)
    if args.device or args.device_map:  # kept with the job: finalization computes there too
        cfg = dataclasses.replace(cfg, device=args.device or cfg.device, device_map=args.device_map or cfg.device_map)
    job = coordinator.create_job(cfg)
    art = coordinator.job(job.job_id).artifacts
    p = art.params
    print(f"job {job.job_id}: {cfg.rounds} rounds; emulator keeps middle blocks {list(art.plan.kept_middle)}; "
          f"params full {p['full']:,}, emulator {p['emulator']:,}, adapter {p['adapter']:,}")
    return 0


DONE_LINGER_S = 15.0  # serve --exit-when-done: how long the coordinator waits for clients to learn that all is over

JOB_SUMMARY = ("job_id", "status", "round", "rounds", "method", "base_model", "clients_per_round", "seats")


def cmd_jobs_list(args) -> int:
    from offsite.cloud.status import read_status

    jobs = read_status(open_coordinator(args.state))["jobs"]
    if args.json:
        print(json.dumps([{k: j[k] for k in JOB_SUMMARY} for j in jobs], indent=2))
        return 0
    for j in jobs:
        print(f"{j['job_id']}: {j['status']}, round {j['round']}/{j['rounds']}, {j['method']} on "
              f"{j['base_model']}, {j['clients_per_round']} updates a round from {j['seats']} selected clients")
    if not jobs:
        print("no jobs yet: offsite cloud jobs create --state S --config job.toml")
    return 0


def cmd_jobs_show(args) -> int:
    from offsite.cloud.status import read_status

    jobs = {j["job_id"]: j for j in read_status(open_coordinator(args.state))["jobs"]}
    if args.job not in jobs:
        raise NotFoundError(f"no job {shown(args.job)}; `offsite cloud jobs list` shows them")
    j = jobs[args.job]
    if args.json:
        print(json.dumps(j, indent=2, allow_nan=False))
        return 0
    print(f"job {j['job_id']}: {j['status']}, round {j['round']}/{j['rounds']}, {j['method']} on "
          f"{j['base_model']}, {j['clients_per_round']} updates a round from {j['seats']} selected clients")
    for r in j["round_log"]:
        how = f"closed: {r['reason']}" if r["status"] == "closed" else "open"
        print(f"  round {r['round']}: {len(r['selected'])} selected, {r['updates']} updates in; {how}")
        if r["selected"]:
            print(f"    selected: {', '.join(r['selected'])}")
    for rej in j["rejected"]:
        print(f"  rejected in round {rej['round']} from {rej['client_id']}: {rej['reason']}")
    return 0


def cmd_jobs_cancel(args) -> int:
    open_coordinator(args.state).cancel_job(args.job)
    print(f"job {args.job} cancelled: its clients are told it is done at their next call, its open round never closes")
    return 0


def cmd_jobs_finalize(args) -> int:
    open_coordinator(args.state).retry_finalization(args.job)
    print(f"job {args.job} is finalizing again: a running `offsite cloud serve --state {args.state}` starts it within "
          "seconds, else the next one does as it starts; `offsite cloud jobs show` then says done or failed")
    return 0


def cmd_jobs_delete(args) -> int:
    deleted = open_coordinator(args.state).delete_job(args.job)
    print(f"job {args.job} deleted: its state, its folder and {deleted.blobs} blobs ({deleted.bytes:,} B) no other job "
          f"uses are gone, and its id can be used again"
          + (f"; its export in {deleted.export_kept} is left as it is" if deleted.export_kept else ""))
    return 0


def cmd_serve(args) -> int:
    from offsite.cloud.finalize import Finalizer
    from offsite.cloud.server import start_server
    from offsite.cloud.web import start_web

    stop = threading.Event()  # set by SIGTERM/SIGINT, or when the last job is done with --exit-when-done
    if not 4 <= args.chunk_kib <= MAX_MESSAGE_BYTES // 2048:
        raise ConfigError(f"--chunk-kib must be in 4..{MAX_MESSAGE_BYTES // 2048}, got {args.chunk_kib}")
    limits = Limits.parse(args.limit)
    coordinator = open_coordinator(args.state, args.chunk_kib * 1024, limits)
    finalizer = Finalizer(coordinator, log)

    def all_over() -> bool:  # --exit-when-done: jobs exist, none trains or finalizes (done, failed or cancelled)
        jobs = coordinator.state.jobs()
        return bool(jobs) and not any(j.status in ("created", "running", "finalizing") for j in jobs) and not finalizer.busy()

    coordinator.on_training_done = finalizer.start
    enroll_address = args.enroll_address or (args.address if args.address.endswith(":0") else enroll_target(args.address))
    for sig in (signal.SIGTERM, signal.SIGINT):  # before serving: a SIGTERM must always mean a drain
        signal.signal(sig, lambda *_: stop.set())
    running = start_server(coordinator, coordinator.layout, args.address, enroll_address, limits)
    web = start_web(coordinator, args.http_address) if args.http_address else None
    if args.port_file:
        ports = {"port": running.port, "enroll_port": running.enroll_port, **({"http_port": web.port} if web else {})}
        atomic_write(Path(args.port_file), json.dumps(ports).encode())
    log.info("coordinator serving on port %d (mutual TLS), enrollment on port %d (TLS)", running.port, running.enroll_port)
    if web:
        log.info("status page, /metrics and /api/status on HTTP port %d (read-only, unauthenticated)", web.port)
    for job in coordinator.state.jobs():
        if job.status == "finalizing":  # a crash interrupted finalization: do it again
            finalizer.start(job.job_id, take_over=True)
    over_since = None
    while not stop.wait(1.0):  # rounds close on the server's round worker (offsite.cloud.worker)
        finalizer.poll()  # a failed finalization that `jobs finalize` sent back
        if args.exit_when_done and all_over():
            # linger until every client was told it is done (a client learns it at its next GetTask), or
            # DONE_LINGER_S: a coordinator gone at once would leave clients retrying an address that is gone
            over_since = over_since or time.monotonic()
            told = all(c.activity == "done" for c in coordinator.state.clients() if c.revoked_at is None)
            if told or time.monotonic() - over_since > DONE_LINGER_S:
                stop.set()
    log.info("coordinator stopping; letting in-flight calls finish for up to %.0f s", args.grace)
    deadline = time.monotonic() + args.grace
    running.enter_graceful_shutdown()
    running.stop(grace=args.grace)
    if web:
        web.stop()
    for t in finalizer.threads:  # a drained upload may have closed the last round: let its finalization end
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    if finalizer.busy():
        log.warning("finalization still running after the grace period; it starts again with the next `serve`")
        logging.shutdown()
        os._exit(0)  # safe at any moment by design, and no interpreter teardown under a running torch thread
    return 0


def cmd_status(args) -> int:
    from offsite.cloud import privacy
    from offsite.cloud.status import describe_eta, read_status

    out = read_status(open_coordinator(args.state))
    if args.json:
        print(json.dumps(out, indent=2, allow_nan=False))  # strict JSON: read_status holds finite numbers only
        return 0
    for j in out["jobs"]:
        print(f"job {j['job_id']}: {j['status']}, round {j['round']}/{j['rounds']}, "
              f"{len(j['updates'])} updates accepted, {len(j['rejected'])} rejected")
        for key, what in (("train_loss", "clients' training loss"), ("heldout_loss", "clients' held-out loss")):
            if j[key]:
                print(f"  {what}: " + ", ".join(f"round {p['round']} {p['loss']:.4f}" for p in j[key][-5:]))
        if j["privacy"]:
            print(f"  {privacy.describe(j['privacy'])}")
        if eta := describe_eta(j):
            print(f"  {eta}")
    now = time.time()
    for c in out["clients"]:
        print(f"  client {c['id']}: {c['activity'] or 'enrolled'}, last seen {now - c['last_seen']:.0f} s ago, "
              f"{c['bytes_out']:,} B sent to it, {c['bytes_in']:,} B received{' (revoked)' if c['revoked'] else ''}")
    return 0


def cmd_clients_add(args) -> int:
    layout = StateLayout(Path(args.state))
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    for name, path in issue_tokens(layout, layout.open_state(), names, args.token_ttl_hours * 3600).items():
        print(f"  enrollment token for {name}: {path}")
    return 0


def cmd_clients_revoke(args) -> int:
    StateLayout(Path(args.state)).open_state().revoke_client(args.client_id)
    print(f"client {args.client_id} revoked: its certificate is refused from the next call on")
    return 0


def cmd_keys_create(args) -> int:
    now = time.time()
    if args.expires_in_days is not None and args.expires_in_days <= 0:
        raise ConfigError(f"--expires-in-days must be positive, got {args.expires_in_days}")
    expires_at = (api_keys.parse_expiry(args.expires) if args.expires
                  else now + args.expires_in_days * 86400 if args.expires_in_days is not None else None)
    secret, key = api_keys.create_key(StateLayout(Path(args.state)).open_state(), args.job, args.label, expires_at, now)
    print(f"API key {key.key_id} for job(s) {', '.join(key.jobs)}, expires {api_keys.format_time(key.expires_at)}")
    print(secret)
    print("This secret is shown only once and cannot be recovered: give it to its user now. "
          f"`offsite cloud keys revoke --state {args.state} {key.key_id}` locks it out.")
    return 0


def cmd_keys_list(args) -> int:
    keys = StateLayout(Path(args.state)).open_state().api_keys()
    now = time.time()
    if args.json:  # never the hash: it is all a brute-force search would need
        print(json.dumps([{"key_id": k.key_id, "jobs": list(k.jobs), "label": k.label, "status": api_keys.key_status(k, now),
                           "created_at": k.created_at, "expires_at": k.expires_at, "revoked_at": k.revoked_at,
                           "last_used": k.last_used} for k in keys], indent=2))
        return 0
    if not keys:
        print("no API keys; `offsite cloud keys create` makes one")
    for k in keys:
        f = api_keys.format_time
        print(f"key {k.key_id}: {api_keys.key_status(k, now)}; jobs {', '.join(k.jobs)}; label {k.label!r}; "
              f"created {f(k.created_at)}; expires {f(k.expires_at)}; revoked {f(k.revoked_at, 'no')}; "
              f"last used {f(k.last_used)}")
    return 0


def cmd_keys_revoke(args) -> int:
    if args.key_id.startswith(api_keys.KEY_PREFIX):  # a pasted secret: say so without echoing it
        raise ConfigError("give the key id that `offsite cloud keys list` shows, not the secret")
    StateLayout(Path(args.state)).open_state().revoke_api_key(args.key_id)
    print(f"API key {args.key_id} revoked: it is refused from the next request on")
    return 0


def cmd_export(args) -> int:
    from offsite.cloud.exports import export_job

    coordinator = open_coordinator(args.state)
    job = coordinator.job(args.job)
    result = export_job(job.config, job.artifacts, coordinator.state.global_adapters(args.job), coordinator.blobs,
                        coordinator.layout.jobs / args.job, args.out, args.format,
                        len(coordinator.state.updates(args.job)), args.rank)
    print(f"job {args.job}: exported {result.format} to {result.folder} after {result.rounds} rounds: {result.detail}")
    return 0


def cmd_eval(args) -> int:
    from offsite.cloud.scoring import score_file
    from offsite.tensors import load_blob

    coordinator = open_coordinator(args.state)
    job = coordinator.job(args.job)
    adapters = coordinator.state.global_adapters(args.job)
    adapter = load_blob(coordinator.blobs.open_path(adapters[-1]))
    scores = score_file(job.config, job.artifacts, adapter, coordinator.layout.jobs / args.job, args.data, args.max_length)
    if args.json:
        print(json.dumps({"job_id": args.job, "status": job.status, "rounds_aggregated": len(adapters) - 1,
                          **scores.to_dict()}, indent=2))
        return 0
    print(f"job {args.job} ({job.status}, {len(adapters) - 1} rounds aggregated) on {args.data}: {scores.examples} examples, "
          f"{scores.learned_tokens} learned tokens")
    print(f"{'':<10}{'loss':>9}{'exact match':>14}")
    for name in ("base", "plug_in"):
        em = f"{scores.exact_match[name]:.1%}" if scores.exact_match else "n/a"
        print(f"{name:<10}{scores.loss[name]:>9.4f}{em:>14}")
    print(f"exact match over the {scores.answerable} examples whose completion is a short answer"
          if scores.exact_match else "no example has a short-answer completion: no exact match")
    return 0


def cmd_probe(args) -> int:
    return health_probe.run(args)  # also `python -m offsite.cloud.probe`: the same check without loading torch


def cmd_infer(args) -> int:
    from offsite.cloud.infer.server import parse_size, run_infer
    from offsite.cloud.infer.service import ServeConfig

    config = ServeConfig(device=args.device, adapter_memory=parse_size(args.adapter_memory) if args.adapter_memory else None,
                         max_batch=args.max_batch, max_queue=args.max_queue, request_timeout=args.request_timeout,
                         max_tokens=args.max_tokens)
    return run_infer(args.state, args.address, config, args.port_file, args.grace)


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init", help="create a state folder: CA, server certificate, keys, enrollment tokens")
    p.add_argument("--state", required=True, help="state folder to create")
    p.add_argument("--clients", required=True, help="comma-separated client names, one token each")
    p.add_argument("--host", action="append", default=None, help="server certificate host name or IP (repeatable)")
    p.add_argument("--token-ttl-hours", type=float, default=72.0)
    p.add_argument("--db", help="state database URL: postgresql://user@host/dbname (password in PGPASSWORD or "
                                "~/.pgpass) or sqlite:///path; default: SQLite inside the state folder. "
                                "$OFFSITE_DB_URL overrides it for every command")
    p.set_defaults(func=cmd_init)
    jobs = sub.add_parser("jobs", help="manage jobs").add_subparsers(dest="jobs_command", required=True)
    p = jobs.add_parser("create", help="build the emulator and open a job from a TOML file")
    p.add_argument("--state", required=True)
    p.add_argument("--config", required=True, help="job TOML file")
    p.add_argument("--device", help="where building the emulator and finalization compute (cpu, cuda, cuda:N); "
                   "overrides the job file's [job] device")
    p.add_argument("--device-map", choices=DEVICE_MAPS, help="accelerate's placement of a base larger than one device "
                   "over the GPUs, the CPU and disk; overrides [job] device_map")
    p.set_defaults(func=cmd_jobs_create)
    p = jobs.add_parser("list", help="every job: status, round, method, base, clients per round")
    p.add_argument("--state", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_jobs_list)
    p = jobs.add_parser("show", help="one job: each round's selected clients, updates and why it closed")
    p.add_argument("--state", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("job")
    p.set_defaults(func=cmd_jobs_show)
    p = jobs.add_parser("cancel", help="stop a running job; its clients stop at their next call")
    p.add_argument("--state", required=True)
    p.add_argument("job")
    p.set_defaults(func=cmd_jobs_cancel)
    p = jobs.add_parser("finalize", help="finalize again a job whose finalization failed (its training finished); "
                                         "a running serve takes it up within seconds")
    p.add_argument("--state", required=True)
    p.add_argument("job")
    p.set_defaults(func=cmd_jobs_finalize)
    p = jobs.add_parser("delete", help="remove a failed, cancelled or done job: its state, folder and the blobs no "
                                       "other job uses; its id can be used again")
    p.add_argument("--state", required=True)
    p.add_argument("job")
    p.set_defaults(func=cmd_jobs_delete)
    clients = sub.add_parser("clients", help="manage enrolled clients").add_subparsers(dest="clients_command", required=True)
    p = clients.add_parser("add", help="issue enrollment tokens for new clients (a job's roster names them)")
    p.add_argument("--state", required=True)
    p.add_argument("--token-ttl-hours", type=float, default=72.0)
    p.add_argument("names", help="comma-separated client names, one token each")
    p.set_defaults(func=cmd_clients_add)
    p = clients.add_parser("revoke", help="lock a client out at once")
    p.add_argument("--state", required=True)
    p.add_argument("client_id")
    p.set_defaults(func=cmd_clients_revoke)
    keys = sub.add_parser("keys", help="API keys that let downstream users query fine-tuned models").add_subparsers(
        dest="keys_command", required=True)
    p = keys.add_parser("create", help="make a key for some jobs' models; prints its secret once")
    p.add_argument("--state", required=True)
    p.add_argument("--job", action="append", required=True, help="a job whose model the key may query (repeatable)")
    p.add_argument("--label", default="", help="who or what the key is for, shown by `keys list`")
    expiry = p.add_mutually_exclusive_group()
    expiry.add_argument("--expires", help="when the key stops working: a date (2027-01-31: as that day begins, UTC) "
                                          "or an ISO 8601 time; default: never")
    expiry.add_argument("--expires-in-days", type=float, help="the key stops working this many days from now")
    p.set_defaults(func=cmd_keys_create)
    p = keys.add_parser("list", help="every key: id, jobs, label, times (never a secret or a hash)")
    p.add_argument("--state", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keys_list)
    p = keys.add_parser("revoke", help="lock a key out at once")
    p.add_argument("--state", required=True)
    p.add_argument("key_id")
    p.set_defaults(func=cmd_keys_revoke)
    p = sub.add_parser("serve", help="run the coordinator (gRPC over mutual TLS)")
    p.add_argument("--state", required=True)
    p.add_argument("--address", default="127.0.0.1:50051", help="host:port for mutual-TLS calls; port 0 picks a free one")
    p.add_argument("--enroll-address", help="host:port for enrollment (server-only TLS); default: --address port + 1")
    p.add_argument("--port-file", help="write the bound ports here as JSON {port, enroll_port[, http_port]}")
    p.add_argument("--http-address", help="host:port for the read-only status page, /metrics and /api/status (plain "
                                          "HTTP, no authentication: keep it on localhost or a private network); off by default")
    p.add_argument("--exit-when-done", action="store_true", help="stop once every job is done, failed or cancelled and "
                   "every client was told so (at most 15 s later)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds to let in-flight calls (uploads) finish on SIGTERM")
    p.add_argument("--chunk-kib", type=int, default=CHUNK_BYTES // 1024,
                   help="transfer chunk size in KiB: what a verified download or a durable upload part holds")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                   help="change one of the limits on time, calls, connections and spool bytes (repeatable; "
                        f"docs/operations.md says what each bounds). Defaults: {Limits.describe()}")
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("infer", help="serve every finished job's model, and its base, over an OpenAI-compatible API (TLS)")
    p.add_argument("--state", required=True)
    p.add_argument("--address", default="127.0.0.1:8443", help="host:port for HTTPS; port 0 picks a free one")
    p.add_argument("--port-file", help="write the bound port here as JSON {port}")
    p.add_argument("--device", default="cpu", help="where the base models and adapters go (cpu, cuda, cuda:N)")
    p.add_argument("--adapter-memory", help="bytes of job adapters held beside each base, e.g. 4GiB; the least "
                   "recently used are evicted beyond it (default: no limit)")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a batch row; more get 429")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds a request may take from arrival")
    p.add_argument("--max-tokens", type=int, default=4096, help="the most tokens one request may ask for")
    p.add_argument("--grace", type=float, default=30.0, help="seconds to let requests in flight finish on SIGTERM")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("status", help="jobs, rounds and clients")
    p.add_argument("--state", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("export", help="write a job's latest global adapter: plugged into the full model, or as a PEFT "
                                      "LoRA adapter on it (for vLLM, LoRAX)")
    p.add_argument("--state", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--format", choices=("merged", "peft"), default="merged",
                   help="merged: a plain model folder (what finalization writes); peft: a LoRA job's change as LoRA "
                        "factors keyed to the full model's layers")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--rank", type=int, help="peft: LoRA rank of the factors (default: the job's r times the updates it "
                                            "aggregated, the most the change can need, capped by the layers' widths)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("eval", help="score a job's model and its base on a data file (text, prompt/completion or chat): "
                                    "loss on the learned tokens, exact match on short answers")
    p.add_argument("--state", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--data", required=True, help="JSONL, CSV or .txt, as clients' data")
    p.add_argument("--max-length", type=int, help="tokens per example (default: the job's [training] max_length)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("probe", help="health check (liveness/readiness): exit 0 iff the coordinator is serving")
    health_probe.add_arguments(p)
    p.set_defaults(func=cmd_probe)
