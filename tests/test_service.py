"""The servicer over a real in-process TLS channel: happy path and every bad input of the skeleton."""
import hashlib
from pathlib import Path

import grpc
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from offsite.client.identity import enroll
from offsite.client.transfer import download_blob, download_bundle, upload
from offsite.cloud.blobs import BlobStore
from offsite.cloud.coordinator import Coordinator
from offsite.cloud.identity import StateLayout, init_state, load_sealing_key
from offsite.cloud.job import JobConfig
from offsite.cloud.server import start_server
from offsite.cloud.state import SqliteState
from offsite.emulator.bundle import load_bundle
from offsite.protos.offsite.v1 import coordinator_pb2 as pb
from offsite.protos.offsite.v1 import coordinator_pb2_grpc as pb_grpc
from offsite.sealing import SealContext, seal
from offsite.tensors import from_bytes, to_bytes
from offsite.transport import secure_channel

CLIENTS = ["client-1", "client-2", "client-3"]


@pytest.fixture
def env(tiny_model, tmp_path):
    layout = StateLayout(tmp_path / "state")
    tokens = init_state(layout.root, CLIENTS, ["localhost", "127.0.0.1"], 3600, SqliteState)
    finished = []
    coordinator = Coordinator(layout, SqliteState(layout.db), BlobStore(layout.blobs), load_sealing_key(layout),
                              on_training_done=finished.append)
    coordinator.create_job(JobConfig(job_id="job1", base_model=str(tiny_model), rounds=2, clients_per_round=2,
                                     emulator_layers=1))
    server, port, _ = start_server(coordinator, layout, "127.0.0.1:0")
    channel = secure_channel(f"localhost:{port}", layout.ca_cert)
    stub = pb_grpc.CoordinatorStub(channel)
    yield {"stub": stub, "coordinator": coordinator, "tokens": tokens, "tmp": tmp_path, "finished": finished}
    channel.close()
    server.stop(None)


def _enroll(env, name):
    return enroll(env["stub"], Path(env["tokens"][name]).read_text().strip(), env["tmp"] / name)


def _code(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def _sealed(me, task, tensors, signer=None, round_=None):
    ctx = SealContext(task.job_id, task.round if round_ is None else round_, me.client_id, task.skeleton_digest)
    return seal(to_bytes(tensors), ctx, me.coordinator_key, signer or me.signing_key)


def _start(env, me):
    task = env["stub"].GetTask(pb.GetTaskRequest(job_id=me.job_id), metadata=me.metadata)
    path = download_blob(env["stub"], me.metadata, task.adapter_sha256, env["tmp"] / f"{me.client_id}.adapter")
    return task, from_bytes(path.read_bytes())


def test_enrollment_tokens_are_single_use(env):
    stub = env["stub"]
    key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    assert _code(lambda: stub.Enroll(pb.EnrollRequest(token="made-up", signing_public_key=key))) == grpc.StatusCode.UNAUTHENTICATED
    token = Path(env["tokens"]["client-1"]).read_text().strip()
    assert _code(lambda: stub.Enroll(pb.EnrollRequest(token=token, signing_public_key=b"short"))) == grpc.StatusCode.INVALID_ARGUMENT
    me = _enroll(env, "client-1")
    assert me.client_id.startswith("client-1") and me.job_id == "job1"
    assert _code(lambda: stub.Enroll(pb.EnrollRequest(token=token, signing_public_key=key))) == grpc.StatusCode.UNAUTHENTICATED
    assert oct((env["tmp"] / "client-1" / "signing.key").stat().st_mode & 0o777) == "0o600"


def test_calls_without_a_session_are_unauthenticated(env):
    stub = env["stub"]
    assert _code(lambda: stub.GetTask(pb.GetTaskRequest())) == grpc.StatusCode.UNAUTHENTICATED
    bad = (("authorization", "Bearer nope"),)
    assert _code(lambda: list(stub.Download(pb.DownloadRequest(sha256="0" * 64), metadata=bad))) == grpc.StatusCode.UNAUTHENTICATED


def test_download_is_verified_and_limited_to_the_job(env):
    me = _enroll(env, "client-1")
    task, adapter = _start(env, me)
    assert task.kind == pb.Task.TRAIN and task.round == 0 and task.total_rounds == 2
    folder = download_bundle(env["stub"], me.metadata, task.bundle_manifest_sha256, env["tmp"] / "bundle")
    model, _, plan = load_bundle(folder)
    assert plan.kept_middle == (3,) and set(adapter) == {k for k in adapter}
    stub = env["stub"]
    assert _code(lambda: list(stub.Download(pb.DownloadRequest(sha256="ab" * 32), metadata=me.metadata))) == grpc.StatusCode.NOT_FOUND
    too_far = pb.DownloadRequest(sha256=task.adapter_sha256, offset=10**9)
    assert _code(lambda: list(stub.Download(too_far, metadata=me.metadata))) == grpc.StatusCode.OUT_OF_RANGE


def test_round_closes_with_weighted_average_and_replay_is_refused(env):
    a, b = _enroll(env, "client-1"), _enroll(env, "client-2")
    task, start = _start(env, a)
    first = _sealed(a, task, {k: v + 1.0 for k, v in start.items()})
    receipt = upload(env["stub"], a.metadata, task.job_id, task.round, 10, first)
    assert (receipt.round, receipt.updates_in_round) == (0, 1)
    assert env["stub"].GetTask(pb.GetTaskRequest(job_id="job1"), metadata=a.metadata).kind == pb.Task.WAIT
    assert _code(lambda: upload(env["stub"], a.metadata, task.job_id, task.round, 10, first)) == grpc.StatusCode.ALREADY_EXISTS
    upload(env["stub"], b.metadata, task.job_id, task.round, 20, _sealed(b, task, {k: v + 4.0 for k, v in start.items()}))
    nxt = env["stub"].GetTask(pb.GetTaskRequest(job_id="job1"), metadata=a.metadata)
    assert nxt.kind == pb.Task.TRAIN and nxt.round == 1
    _, merged = _start(env, a)
    name = next(iter(start))
    assert torch.allclose(merged[name], start[name] + 3.0, atol=1e-5)  # (10*1 + 20*4) / 30
    assert len(env["coordinator"].state.updates("job1")) == 2


def _mutations(start):
    name = next(iter(start))
    return {
        "wrong shape": {**start, name: torch.zeros(3, 3)},
        "nan": {**start, name: torch.full_like(start[name], float("nan"))},
        "extra tensor": {**start, "model.evil.weight": torch.zeros(1)},
        "missing tensor": {k: v for k, v in start.items() if k != name},
        "wrong dtype": {**start, name: start[name].half()},
    }


@pytest.mark.parametrize("kind", ["wrong shape", "nan", "extra tensor", "missing tensor", "wrong dtype",
                                  "tampered", "wrong signature", "sealed for another round"])
def test_bad_updates_are_rejected_and_nothing_is_stored(env, kind):
    me = _enroll(env, "client-1")
    task, start = _start(env, me)
    if kind in ("tampered", "wrong signature", "sealed for another round"):
        signer = Ed25519PrivateKey.generate() if kind == "wrong signature" else None
        envelope = _sealed(me, task, start, signer=signer, round_=1 if kind == "sealed for another round" else None)
        if kind == "tampered":
            envelope = envelope[:100] + bytes([envelope[100] ^ 1]) + envelope[101:]
    else:
        envelope = _sealed(me, task, _mutations(start)[kind])
    assert _code(lambda: upload(env["stub"], me.metadata, task.job_id, task.round, 10, envelope)) == grpc.StatusCode.INVALID_ARGUMENT
    state = env["coordinator"].state
    assert state.updates("job1") == [] and len(state.rejections("job1")) == 1


@pytest.mark.parametrize("job_id, round_", [("job1", 1), ("job1", 7), ("other-job", 0)])
def test_wrong_job_or_round_is_a_failed_precondition(env, job_id, round_):
    me = _enroll(env, "client-1")
    task, start = _start(env, me)
    envelope = seal(to_bytes(start), SealContext(job_id, round_, me.client_id, task.skeleton_digest), me.coordinator_key, me.signing_key)
    assert _code(lambda: upload(env["stub"], me.metadata, job_id, round_, 10, envelope)) == grpc.StatusCode.FAILED_PRECONDITION
    assert env["coordinator"].state.updates("job1") == []


def test_upload_that_lies_about_its_size_or_hash(env):
    me = _enroll(env, "client-1")
    task, start = _start(env, me)
    envelope = _sealed(me, task, start)

    def send(size, digest):
        header = pb.UploadHeader(job_id="job1", round=0, num_examples=5, size=size, sha256=digest)
        return env["stub"].Upload(iter([pb.UploadChunk(header=header), pb.UploadChunk(data=envelope)]), metadata=me.metadata)

    assert _code(lambda: send(len(envelope) - 1, hashlib.sha256(envelope).hexdigest())) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: send(len(envelope), "0" * 64)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: env["stub"].Upload(iter([pb.UploadChunk(data=b"x")]), metadata=me.metadata)) == grpc.StatusCode.INVALID_ARGUMENT
    assert env["coordinator"].state.updates("job1") == []


def test_job_finishes_after_the_last_round(env):
    a, b = _enroll(env, "client-1"), _enroll(env, "client-2")
    for round_ in range(2):
        for me in (a, b):
            task, start = _start(env, me)
            assert task.round == round_
            upload(env["stub"], me.metadata, task.job_id, task.round, 5, _sealed(me, task, start))
    assert env["finished"] == ["job1"]
    assert env["stub"].GetTask(pb.GetTaskRequest(job_id="job1"), metadata=a.metadata).kind == pb.Task.DONE
