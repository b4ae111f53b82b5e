"""The client's main loop: enroll once, then ask for a task, train, seal, upload, until the job is done."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

from offsite import lm
from offsite.client.identity import enroll, load_identity
from offsite.client.train import LocalTrainer
from offsite.client.transfer import download_blob, download_bundle, upload
from offsite.errors import ConfigError, DataError
from offsite.protos.offsite.v1 import coordinator_pb2 as pb
from offsite.protos.offsite.v1 import coordinator_pb2_grpc as pb_grpc
from offsite.sealing import SealContext, seal
from offsite.tensors import from_bytes, to_bytes
from offsite.textdata import read_texts
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

    def __post_init__(self) -> None:
        if not Path(self.ca_file).is_file():
            raise ConfigError(f"{self.ca_file}: CA certificate file not found")


def _token(cfg: ClientConfig) -> str:
    if cfg.token_file is None or not Path(cfg.token_file).is_file():
        raise ConfigError("this client is not enrolled yet and no --token-file was given")
    return Path(cfg.token_file).read_text().strip()


def run(cfg: ClientConfig) -> dict:
    """Take part in the job until it is done. Returns a summary of what this client did."""
    texts = read_texts(cfg.data)  # a bad file fails here, before any network or training
    heldout = read_texts(cfg.heldout) if cfg.heldout else None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    me = load_identity(cfg.workdir)
    if me is None:
        enroll_at = cfg.enroll_server or enroll_target(cfg.server)
        with secure_channel(enroll_at, cfg.ca_file) as channel:  # the one call made without a client certificate
            me = enroll(pb_grpc.CoordinatorStub(channel), _token(cfg), cfg.workdir)
    with secure_channel(cfg.server, cfg.ca_file, me.tls_key_pem, me.certificate_pem) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        log.info("client %s: %d training examples from %s", me.client_id, len(texts), cfg.data)
        trainer, rounds_done, upload_bytes = None, [], 0

        def summary() -> dict:
            return {"client_id": me.client_id, "rounds": rounds_done, "upload_bytes": upload_bytes}

        while True:
            task = stub.GetTask(pb.GetTaskRequest(job_id=me.job_id))
            if task.kind == pb.Task.DONE:
                log.info("client %s: job %s is done", me.client_id, task.job_id)
                return summary()
            if task.kind == pb.Task.WAIT:
                time.sleep(max(task.retry_after_s, 0.2))
                continue
            if trainer is None:
                bundle = download_bundle(stub, task.bundle_manifest_sha256, cfg.workdir / "bundle")
                trainer = LocalTrainer(bundle, texts, heldout, task.training.max_length)
            adapter_path = download_blob(stub, task.adapter_sha256, cfg.workdir / "adapters" / f"global-{task.round}.safetensors")
            t = task.training
            train_cfg = lm.TrainConfig(epochs=t.epochs, lr=t.lr, batch_size=t.batch_size, seed=t.seed + 1000 * task.round,
                                       bf16=lm.cpu_has_fast_bf16())
            result = trainer.train_round(from_bytes(adapter_path.read_bytes()), task.skeleton_digest, train_cfg,
                                         desc=f"{me.client_id} round {task.round + 1}/{task.total_rounds}", show_progress=cfg.show_progress)
            ctx = SealContext(task.job_id, task.round, me.client_id, task.skeleton_digest)
            envelope = seal(to_bytes(result.adapter), ctx, me.coordinator_key, me.signing_key)
            receipt = upload(stub, task.job_id, task.round, len(texts), envelope)
            upload_bytes += len(envelope)
            rounds_done.append(task.round)
            log.info("client %s: round %d trained (%d steps, %.0f tok/s, local held-out %s -> %s), sealed %d bytes, "
                     "accepted as %d of the round", me.client_id, task.round, result.stats.steps, result.stats.tokens_per_s,
                     _fmt(result.heldout_before), _fmt(result.heldout_after), len(envelope), receipt.updates_in_round)
            if task.round + 1 >= task.total_rounds:  # the last round: nothing more to ask the coordinator
                log.info("client %s: took part in the last round of job %s", me.client_id, task.job_id)
                return summary()


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
