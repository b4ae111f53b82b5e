"""The client's main loop: enroll once, then ask for a task, train, seal, upload, until every job on whose
roster the client is (or the one `--job` names) is done."""
from __future__ import annotations

import contextlib
import dataclasses

import hashlib
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch
from cryptography import x509

from offsite import failpoints, lm, precision
from offsite.checkpoint import Checkpointer
from offsite.client.identity import enroll, load_identity
from offsite.client.train import LocalTrainer, RoundResult
from offsite.emulator.methods import MethodConfig
from offsite.client.retry import HandshakeFailed, with_retry
from offsite.client.secure import SecAggLost, masked_input, secure_submit
from offsite.client.transfer import coordinator_stub, download_blob, download_bundle, upload
from offsite.errors import ConfigError, DataError
from offsite.files import atomic_write, sha256_file
from offsite.protos.offsite.v1 import coordinator_pb2 as pb
from offsite.protos.offsite.v1 import coordinator_pb2_grpc as pb_grpc
from offsite.sealing import SealContext, seal
from offsite.tensors import from_bytes, load_blob, to_bytes
from offsite.textdata import read_examples
from offsite.transport import enroll_target, secure_channel

log = logging.getLogger("offsite.client")


@dataclass(frozen=True)
class ClientConfig:
    server: str               # host:port of the mutual-TLS endpoint
    ca_file: Path
    workdir: Path
    data: Path
    heldout: Path | None = None
    token_file: Path | None = None
    threads: int | None = None
    show_progress: bool = True
    enroll_server: str | None = None   # default: the server's port + 1
    retry_s: float = 600.0             # how long to keep retrying while the coordinator is unreachable
    text_column: str = "text"          # the column of a CSV file that holds the text
    checkpoint_every: int = 50         # optimizer steps between training checkpoints...
    checkpoint_every_s: float = 60.0   # ...or seconds, whichever comes first
    device: str = "cpu"                # "cuda" trains on the GPU (bf16, paged 8-bit AdamW)
    job: str | None = None             # take part in this job only (default: every job whose roster holds the client)

    def __post_init__(self) -> None:
        ca = Path(self.ca_file).resolve()
        if not ca.is_file():
            raise ConfigError(f"--ca {ca}: CA certificate file not found")
        try:
            x509.load_pem_x509_certificates(ca.read_bytes())
        except ValueError:
            raise ConfigError(f"--ca {ca}: not a PEM certificate (the coordinator's STATE/tls/ca.pem is; an enrollment "
                              "token goes to --token-file)") from None
        if self.token_file is not None and not Path(self.token_file).is_file():
            raise ConfigError(f"--token-file {Path(self.token_file).resolve()}: no such file (the model owner's "
                              "STATE/tokens/<name>.token, given to you once)")
        if self.checkpoint_every < 1 or not self.checkpoint_every_s > 0:
            raise ConfigError(f"--checkpoint-every must be >= 1 and --checkpoint-every-s > 0, got {self.checkpoint_every} "
                              f"and {self.checkpoint_every_s}")


def default_threads(cores: int, clients: int) -> int:
    """Torch threads for one client: the cores it may use, shared among the clients running on this machine.
    Two clients each taking every core of a 2-core machine ran 10x slower per step than with one thread each."""
    return max(1, cores // max(clients, 1))


def running_clients(proc: Path = Path("/proc")) -> int:
    """How many `offsite client run` processes this machine runs, this one included (Linux; 1 elsewhere)."""
    count = 0
    for cmdline in proc.glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if b"client" in args and b"run" in args and any(a.endswith((b"offsite", b"offsite.cli")) for a in args):
            count += 1
    return max(count, 1)


def _token(cfg: ClientConfig) -> str:
    if cfg.token_file is None or not Path(cfg.token_file).is_file():
        raise ConfigError("this client is not enrolled yet and no --token-file was given")
    return Path(cfg.token_file).read_text().strip()


class RoundClosed(Exception):
    """The coordinator closed the round this client was training for (it came too late)."""


class Liveness:
    """Reports what the client is doing every `interval_s` with a short Heartbeat call from a thread, so no
    stream is held open across local training. Best effort: a missed beat is logged, never fatal."""

    def __init__(self, stub, job_id: str, round_: int, interval_s: float):
        self._stub, self._job_id, self._round, self._interval = stub, job_id, round_, max(interval_s, 0.5)
        self.activity, self.progress, self.round_open = "starting", 0.0, True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)

    def __enter__(self) -> "Liveness":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def report(self, activity: str, progress: float = 0.0) -> None:
        self.activity, self.progress = activity, progress

    def _loop(self) -> None:
        while True:
            try:
                resp = self._stub.Heartbeat(pb.HeartbeatRequest(job_id=self._job_id, round=self._round, activity=self.activity,
                                                                progress=self.progress), timeout=10)
                self.round_open = resp.round_open
            except grpc.RpcError as e:
                log.debug("heartbeat missed: %s", e.code().name)
            if self._stop.wait(self._interval):
                return


@contextlib.contextmanager
def failures_reported(stub, task):
    """An error that stops this client in a round reaches the coordinator before the client exits: a short
    reason (the error's type and first line, at most 240 characters; never data or keys), which `cloud
    status` and the status page show at once, instead of a round that waits for this client forever."""
    try:
        yield
    except grpc.RpcError:
        raise  # the coordinator refused or is unreachable: nothing to tell it over this channel
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        reason = f"{type(e).__name__}: {first}"[:240]
        try:
            stub.Heartbeat(pb.HeartbeatRequest(job_id=task.job_id, round=task.round, activity="failed", failure=reason),
                           timeout=10)
        except grpc.RpcError as rpc:
            log.warning("could not tell the coordinator why this client stops: %s", rpc.code().name)
        raise


@dataclass(frozen=True)
class ClientSummary:
    """What a client did, for its last log line: the rounds it sent an update for (from 1, as in every log
    line), by job, and the bytes it uploaded."""
    client_id: str
    rounds: dict[str, list[int]]
    upload_bytes: int

    def __str__(self) -> str:
        took = "; ".join(f"job {job} rounds {', '.join(map(str, rounds))}" for job, rounds in self.rounds.items())
        return f"client {self.client_id} done: {took or 'no round'}; {self.upload_bytes:,} bytes uploaded"


@contextlib.contextmanager
def _explained(cfg: ClientConfig, address: str, enrolled: bool):
    """A failed TLS handshake as a configuration error that names the files to check (never retried)."""
    try:
        yield
    except HandshakeFailed as e:
        ca = Path(cfg.ca_file).resolve()
        if "signature" in str(e).lower() or "verify" in str(e).lower():
            why = (f"the coordinator's certificate is not signed by --ca {ca}: that file is another coordinator's CA "
                   "(from another `offsite cloud init`?); ask the model owner for their STATE/tls/ca.pem")
        else:
            why = (f"check that {address} is the coordinator's {'gRPC' if enrolled else 'enrollment'} port and --ca {ca} "
                   "its STATE/tls/ca.pem" + (f"; this workdir's identity ({cfg.workdir.resolve()}) may be enrolled with "
                                             "another coordinator: use a new --workdir and a new token" if enrolled else ""))
        raise ConfigError(f"TLS handshake with {address} failed ({e}): {why}") from None


def run(cfg: ClientConfig) -> ClientSummary:
    """Take part in the job until it is done. Returns a summary of what this client did."""
    texts = read_examples(cfg.data, cfg.text_column)  # a bad file fails here, before any network or training
    heldout = read_examples(cfg.heldout, cfg.text_column) if cfg.heldout else None
    threads = cfg.threads or default_threads(len(os.sched_getaffinity(0)), running_clients())
    torch.set_num_threads(threads)
    log.info("training on %d CPU thread(s)%s", threads, "" if cfg.threads else
             " (this process's cores shared among the offsite clients running here; --threads sets it)")
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    me = load_identity(cfg.workdir)
    if me is None:
        enroll_at = cfg.enroll_server or enroll_target(cfg.server)
        with secure_channel(enroll_at, cfg.ca_file) as channel, _explained(cfg, enroll_at, enrolled=False):
            stub = pb_grpc.CoordinatorStub(channel)  # the one call made without a client certificate
            me = with_retry(lambda: enroll(stub, _token(cfg), cfg.workdir), "enroll", cfg.retry_s)
    with (secure_channel(cfg.server, cfg.ca_file, me.tls_key_pem, me.certificate_pem) as channel,
          _explained(cfg, cfg.server, enrolled=True)):
        stub = coordinator_stub(channel)
        log.info("client %s: %d training examples from %s", me.client_id, len(texts), cfg.data)
        trainer, trainer_job, jobs_done, upload_bytes = None, "", {}, 0

        def retried(fn, what):
            return with_retry(fn, what, cfg.retry_s)

        while True:
            task = retried(lambda: stub.GetTask(pb.GetTaskRequest(job_id=cfg.job or "")), "GetTask")
            if task.kind == pb.Task.DONE:
                log.info("client %s: %s", me.client_id, f"job {cfg.job} is over" if cfg.job else "every job on its roster is over")
                break
            if task.kind == pb.Task.WAIT:
                time.sleep(max(task.retry_after_s, 0.2))
                continue
            privacy = task.training.privacy
            outbox = cfg.workdir / "outbox" / f"{task.job_id}-round-{task.round}.{'update' if privacy.secure_aggregation else 'sealed'}"
            with failures_reported(stub, task), Liveness(stub, task.job_id, task.round, task.heartbeat_s) as live:
                train_loss = heldout_loss = None  # unknown when the update was sealed before a restart
                if not outbox.is_file():  # else: sealed before a restart; send those bytes, do not train again
                    live.report("downloading")
                    if trainer is None or trainer_job != task.job_id:  # one job's model in memory at a time
                        trainer = None
                        bundle = retried(lambda: download_bundle(stub, task.bundle_manifest_sha256, _bundle(cfg, task)),
                                         "download bundle")
                        trainer = LocalTrainer(bundle, texts, heldout, task.training.max_length, task.training.pack, cfg.device)
                        trainer_job = task.job_id
                        log.info("client %s: job %s's tokenizer: %s", me.client_id, task.job_id, trainer.report)
                        if task.training.report_heldout and heldout is None:
                            log.info("client %s: job %s asks for the held-out loss of each global adapter; this client "
                                     "reports none (no --heldout file)", me.client_id, task.job_id)
                    try:
                        result = _train(stub, task, trainer, me, cfg, live, retried)
                    except RoundClosed:
                        log.warning("client %s: round %d closed while training; asking for a new task", me.client_id, task.round + 1)
                        continue
                    train_loss = _reportable_loss(result.stats.mean_loss, privacy)
                    if task.training.report_heldout:
                        heldout_loss = _reportable_loss(result.heldout_before, privacy)
                    ctx = SealContext(task.job_id, task.round, me.client_id, task.skeleton_digest)
                    payload = (to_bytes(result.update) if privacy.secure_aggregation  # masked later; kept on this machine only
                               else seal(to_bytes(result.update), ctx, me.coordinator_key, me.signing_key))
                    atomic_write(outbox, payload, mode=0o600)  # a crash from here on resumes the upload, not the training
                if privacy.secure_aggregation:
                    live.report("secure aggregation")
                    def make_input():  # called only once this client is in the run's roster
                        return masked_input(_bundle(cfg, task), from_bytes(_global_adapter(cfg, task).read_bytes()),
                                            from_bytes(outbox.read_bytes()), _method(task), privacy, len(texts))
                    try:
                        accepted, sent = secure_submit(stub, task, me, make_input, cfg.retry_s)
                    except SecAggLost as e:
                        log.warning("client %s: round %d: not in the secure aggregation run (%s); the update waits", me.client_id,
                                    task.round + 1, e)
                        time.sleep(2.0)
                        continue
                else:
                    live.report("uploading")
                    envelope = outbox.read_bytes()
                    try:
                        accepted, sent = _upload_once(stub, task, len(texts), envelope, retried, train_loss,
                                                  heldout_loss), len(envelope)
                    except RoundClosed as e:  # it trained for a round that closed without it: on to the next one
                        log.warning("client %s: round %d closed before its update was in (%s); asking for a new task",
                                    me.client_id, task.round + 1, e)
                        outbox.unlink()
                        continue
            outbox.unlink()
            upload_bytes += sent
            jobs_done.setdefault(task.job_id, []).append(task.round + 1)
            log.info("client %s: round %d: sent %d bytes, %s", me.client_id, task.round + 1, sent, accepted)
            if cfg.job and task.round + 1 >= task.total_rounds:  # its one job's last round: nothing more to ask
                log.info("client %s: took part in the last round of job %s", me.client_id, task.job_id)
                break
    return ClientSummary(me.client_id, jobs_done, upload_bytes)


def _bundle(cfg: ClientConfig, task) -> Path:
    return cfg.workdir / "jobs" / task.job_id / "bundle"


def _global_adapter(cfg: ClientConfig, task) -> Path:
    return cfg.workdir / "jobs" / task.job_id / "adapters" / f"global-{task.round}.safetensors"


def _method(task) -> MethodConfig:
    m = task.training.method  # the coordinator sends every field; no method at all means whole blocks
    return MethodConfig(**{f.name: getattr(m, f.name) for f in m.DESCRIPTOR.fields}) if m.name else MethodConfig()


def schedule_part(kind: str, round_: int, rounds: int) -> tuple[float, float]:
    """The part of the learning-rate schedule a round covers: all of it ("round", or "" from an older
    coordinator), or its share of one schedule over the job's rounds ("job")."""
    if kind in ("", "round"):
        return 0.0, 1.0
    if kind != "job" or not 0 <= round_ < rounds:
        raise ConfigError(f"the coordinator sent lr_schedule {kind!r:.40} for round {round_ + 1} of {rounds}")
    return round_ / rounds, (round_ + 1) / rounds


def checkpoint_key(task, method, train_cfg: lm.TrainConfig, data_sha256: str) -> str:
    """What a round's training checkpoint belongs to: the round, its start, the method, the settings and the data.
    It names what is trained, not how: bf16 autocast is a timing probe's choice (precision.choose), which a
    restart on a busy machine can make differently (the checkpoint holds the fp32 master weights either way)."""
    trained = dataclasses.replace(train_cfg, bf16=False)
    key = (f"{task.job_id}/{task.round}/{task.adapter_sha256}/{task.emulator_patch_sha256}/{method}/{trained}/"
           f"{data_sha256}")
    return hashlib.sha256(key.encode()).hexdigest()


def _train(stub, task, trainer: LocalTrainer, me, cfg: ClientConfig, live: Liveness, retried) -> RoundResult:
    """Train the round; the result holds the update (the method's trainable tensors) and the training stats."""
    adapter_path = retried(lambda: download_blob(stub, task.adapter_sha256, _global_adapter(cfg, task)), "download adapter")
    patch = task.emulator_patch_sha256  # the emulator re-aligned by the model owner: its kept middle, verified like any blob
    patch_path = patch and retried(lambda: download_blob(stub, patch, cfg.workdir / "jobs" / task.job_id / "emulator-patch.safetensors"),
                                   "download emulator patch")
    t = task.training
    compute = precision.choose(cfg.device)
    log.info("client %s: %s", me.client_id, compute.describe(trainer.stored_dtype))
    train_cfg = lm.TrainConfig(epochs=t.epochs, lr=t.lr, batch_size=t.batch_size, seed=t.seed + 1000 * task.round,
                               bf16=compute.autocast, grad_accum=max(t.grad_accum, 1),
                               gradient_checkpointing=t.gradient_checkpointing, prox_mu=t.prox_mu,
                               schedule=schedule_part(t.lr_schedule, task.round, task.total_rounds))

    def on_step(step: int, total: int) -> None:
        live.report("training", step / total)
        failpoints.hit("client.train.step")
        if not live.round_open:
            raise RoundClosed()

    method = _method(task)
    key = checkpoint_key(task, method, train_cfg, sha256_file(cfg.data))
    checkpoint = Checkpointer(cfg.workdir / "checkpoints", key, cfg.checkpoint_every,
                              cfg.checkpoint_every_s)
    result = trainer.train_round(load_blob(adapter_path), task.skeleton_digest, train_cfg, method,
                                 desc=f"{me.client_id} round {task.round + 1}/{task.total_rounds}",
                                 show_progress=cfg.show_progress, on_step=on_step, checkpoint=checkpoint,
                                 upload_dtype=precision.parse_dtype(t.upload_dtype) if t.upload_dtype else None,
                                 emulator_patch=load_blob(patch_path) if patch_path else None)
    log.info("client %s: round %d trained with %s (%d trainable params, %d steps, %.0f tok/s, peak memory %.0f MiB, "
             "local held-out %s -> %s)", me.client_id, task.round + 1, method.name, result.trainable_params,
             result.stats.steps, result.stats.tokens_per_s, result.stats.peak_memory_bytes / 2**20,
             _fmt(result.heldout_before), _fmt(result.heldout_after))
    return result


def _reportable_loss(mean_loss: float | None, privacy: pb.Privacy) -> float | None:
    """A loss (training, or held-out) to show the coordinator, or None. Never under secure aggregation or DP: a
    client's own loss is a statistic of its data that neither the masks nor the privacy accountant covers."""
    if mean_loss is None or privacy.secure_aggregation or privacy.equal_weights or not math.isfinite(mean_loss):
        return None
    return mean_loss


def _upload_once(stub, task, num_examples: int, envelope: bytes, retried, train_loss: float | None,
                 heldout_loss: float | None) -> str:
    """Upload until accepted. ALREADY_EXISTS means the coordinator counted this client's update for the round
    before a crash or a lost reply (only this client's certificate can have sent it): that is success.
    FAILED_PRECONDITION means the round is over without it: RoundClosed."""
    try:
        receipt = retried(lambda: upload(stub, task.job_id, task.round, num_examples, envelope, train_loss, heldout_loss),
                          "upload")
        return f"accepted as update {receipt.updates_in_round} of the round"
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.FAILED_PRECONDITION:  # the round closed (or the job ended) before it was in
            raise RoundClosed(e.details()) from None
        if e.code() != grpc.StatusCode.ALREADY_EXISTS:
            raise
        return "already accepted before a restart"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


EXIT_OK, EXIT_DATA, EXIT_AUTH, EXIT_UNREACHABLE, EXIT_CONFIG = 0, 2, 3, 4, 5


def exit_code_for(error: Exception) -> int:
    if isinstance(error, DataError):
        return EXIT_DATA
    if isinstance(error, ConfigError):
        return EXIT_CONFIG
    if isinstance(error, grpc.RpcError):
        if error.code() == grpc.StatusCode.UNAUTHENTICATED:
            return EXIT_AUTH
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            return EXIT_UNREACHABLE
    return 1
