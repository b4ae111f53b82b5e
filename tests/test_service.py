"""The servicer over a real in-process mutual-TLS channel: happy path and every bad input."""
import datetime as dt
import hashlib
import time
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from offsite.client.identity import enroll
from offsite.client.transfer import download_blob, download_bundle, upload
from offsite.cloud.coordinator import Coordinator
from offsite.cloud.identity import CertificateAuthority, StateLayout, hash_secret, init_state
from offsite.cloud.job import JobConfig
from offsite.cloud.server import start_server
from offsite.emulator.bundle import load_bundle
from offsite.errors import IntegrityError
from offsite.protos.offsite.v1 import coordinator_pb2 as pb
from offsite.protos.offsite.v1 import coordinator_pb2_grpc as pb_grpc
from offsite.sealing import SealContext, seal
from offsite.tensors import from_bytes, to_bytes
from offsite.transport import MAX_MESSAGE_BYTES, secure_channel

CLIENTS = ["client-1", "client-2", "client-3"]
CHUNK = 4096


class Env:
    def __init__(self, layout, coordinator, tokens, tmp, running):
        self.layout, self.coordinator, self.tokens, self.tmp = layout, coordinator, tokens, tmp
        self.target, self.channels, self.finished = f"localhost:{running.port}", [], []
        self.anon = self.stub(target=f"localhost:{running.enroll_port}")  # the enrollment port: TLS, no client cert

    def stub(self, key_pem=None, cert_pem=None, target=None):
        channel = secure_channel(target or self.target, self.layout.ca_cert, key_pem, cert_pem)
        self.channels.append(channel)
        return pb_grpc.CoordinatorStub(channel)

    def token(self, name):
        return Path(self.tokens[name]).read_text().strip()

    def enroll(self, name):
        me = enroll(self.anon, self.token(name), self.tmp / name)
        return me, self.stub(me.tls_key_pem, me.certificate_pem)


@pytest.fixture
def env(tiny_model, tmp_path):
    layout = StateLayout(tmp_path / "state")
    tokens = init_state(layout.root, CLIENTS, ["localhost", "127.0.0.1"], 3600)
    coordinator = Coordinator.open(layout.root, chunk_bytes=CHUNK)  # small chunks: many per blob
    coordinator.create_job(JobConfig(job_id="job1", base_model=str(tiny_model), rounds=2, clients_per_round=2,
                                     emulator_layers=1))
    running = start_server(coordinator, layout, "127.0.0.1:0", "127.0.0.1:0")
    e = Env(layout, coordinator, tokens, tmp_path, running)
    coordinator.on_training_done = e.finished.append
    yield e
    for channel in e.channels:
        channel.close()
    running.stop(None)


def _code(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def _sealed(me, task, tensors, signer=None, round_=None):
    ctx = SealContext(task.job_id, task.round if round_ is None else round_, me.client_id, task.skeleton_digest)
    return seal(to_bytes(tensors), ctx, me.coordinator_key, signer or me.signing_key)


def _until(predicate, timeout=20.0):
    """Wait for what the server's round worker does on its own thread (a round's close) to show."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the round worker did not get there in time"
        time.sleep(0.05)


def _train_task(stub, job_id="job1"):
    """The next TRAIN task, once the round worker has closed the round before it."""
    tasks = []
    _until(lambda: tasks.append(stub.GetTask(pb.GetTaskRequest(job_id=job_id))) or tasks[-1].kind == pb.Task.TRAIN)
    return tasks[-1]


def _start(env, me, stub):
    task = _train_task(stub, me.job_id)
    path = download_blob(stub, task.adapter_sha256, env.tmp / f"{me.client_id}.adapter")
    return task, from_bytes(path.read_bytes())


def _csr(key=None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
    return csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_enrollment_tokens_are_single_use(env):
    key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()

    def enroll_with(token, k=key, csr=None):
        return env.anon.Enroll(pb.EnrollRequest(token=token, signing_public_key=k, csr_pem=csr or _csr()))

    assert _code(lambda: enroll_with("made-up")) == grpc.StatusCode.UNAUTHENTICATED
    token = env.token("client-1")
    assert _code(lambda: enroll_with(token, k=b"short")) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: enroll_with(token, csr=b"-----BEGIN CERTIFICATE REQUEST-----\ngarbage")) == grpc.StatusCode.INVALID_ARGUMENT
    me, _ = env.enroll("client-1")  # the bad requests above did not spend the token
    assert me.client_id.startswith("client-1") and me.job_id == "job1"
    cert = x509.load_pem_x509_certificate(me.certificate_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == me.client_id
    assert _code(lambda: enroll_with(token)) == grpc.StatusCode.UNAUTHENTICATED
    for secret in ("signing.key", "tls.key", "identity.json"):
        assert oct((env.tmp / "client-1" / secret).stat().st_mode & 0o777) == "0o600"


def test_calls_without_a_client_certificate_are_refused(env):
    # on the enrollment port the TLS handshake works, but nothing but Enroll is allowed without a certificate
    assert _code(lambda: env.anon.GetTask(pb.GetTaskRequest())) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: list(env.anon.Download(pb.DownloadRequest(sha256="0" * 64)))) == grpc.StatusCode.UNAUTHENTICATED
    # on the main port a plain-TLS client (no certificate) does not get through the handshake
    plain = env.stub()
    assert _code(lambda: plain.GetTask(pb.GetTaskRequest(), timeout=10)) == grpc.StatusCode.UNAVAILABLE


def test_certificate_from_another_ca_is_refused_at_the_handshake(env):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client-1-deadbeef")])
    now = dt.datetime.now(dt.timezone.utc)
    forged = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
              .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    stub = env.stub(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
                    forged.public_bytes(serialization.Encoding.PEM))
    assert _code(lambda: stub.GetTask(pb.GetTaskRequest(), timeout=10)) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)


def test_certificate_from_our_ca_for_an_unknown_client_is_refused(env):
    key = ec.generate_private_key(ec.SECP256R1())
    ca = CertificateAuthority.load(env.layout)
    cert = ca.issue_client_certificate(ca.load_csr(_csr(key)), "ghost-00000000")  # e.g. a client deleted from the state
    stub = env.stub(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), cert)
    assert _code(lambda: stub.GetTask(pb.GetTaskRequest(job_id="job1"))) == grpc.StatusCode.UNAUTHENTICATED


def test_revoked_client_is_locked_out_at_once(env):
    me, stub = env.enroll("client-1")
    assert stub.GetTask(pb.GetTaskRequest(job_id="job1")).kind == pb.Task.TRAIN
    env.coordinator.state.revoke_client(me.client_id)
    assert _code(lambda: stub.GetTask(pb.GetTaskRequest(job_id="job1"))) == grpc.StatusCode.UNAUTHENTICATED


def test_download_is_verified_and_limited_to_the_job(env):
    me, stub = env.enroll("client-1")
    task, adapter = _start(env, me, stub)
    assert task.kind == pb.Task.TRAIN and task.round == 0 and task.total_rounds == 2
    folder = download_bundle(stub, task.bundle_manifest_sha256, env.tmp / "bundle")
    _, _, plan = load_bundle(folder)
    assert plan.kept_middle == (3,) and adapter
    assert _code(lambda: list(stub.Download(pb.DownloadRequest(sha256="ab" * 32)))) == grpc.StatusCode.NOT_FOUND
    too_far = pb.DownloadRequest(sha256=task.adapter_sha256, first_chunk=10**6)
    assert _code(lambda: list(stub.Download(too_far))) == grpc.StatusCode.OUT_OF_RANGE


def test_round_closes_with_weighted_average_and_replay_is_refused(env):
    (a, sa), (b, sb) = env.enroll("client-1"), env.enroll("client-2")
    task, start = _start(env, a, sa)
    first = _sealed(a, task, {k: v + 1.0 for k, v in start.items()})
    receipt = upload(sa, task.job_id, task.round, 10, first, train_loss=1.25)
    assert (receipt.round, receipt.updates_in_round) == (0, 1)
    assert sa.GetTask(pb.GetTaskRequest(job_id="job1")).kind == pb.Task.WAIT
    assert _code(lambda: upload(sa, task.job_id, task.round, 10, first)) == grpc.StatusCode.ALREADY_EXISTS
    second = _sealed(b, task, {k: v + 4.0 for k, v in start.items()})
    assert _code(lambda: upload(sb, task.job_id, task.round, 20, second, train_loss=float("nan"))) == grpc.StatusCode.INVALID_ARGUMENT
    upload(sb, task.job_id, task.round, 20, second)  # no loss reported
    nxt = _train_task(sa)
    assert nxt.kind == pb.Task.TRAIN and nxt.round == 1
    _, merged = _start(env, a, sa)
    name = next(iter(start))
    # FedAvg by examples would give (10*1 + 20*4) / 30 = 3; the default max_weight_share 0.5 caps client-2's
    # 20 at 10, so that neither of two clients weighs more than the other: (10*1 + 10*4) / 20 = 2.5
    assert torch.allclose(merged[name], start[name] + 2.5, atol=1e-5)
    assert [(u.client_id, u.train_loss) for u in env.coordinator.state.updates("job1")] == [(a.client_id, 1.25), (b.client_id, None)]


def test_another_clients_update_cannot_be_passed_off(env):
    (a, sa), (_, sb) = env.enroll("client-1"), env.enroll("client-2")
    task, start = _start(env, a, sa)
    stolen = _sealed(a, task, start)  # sealed and signed by client-1, sent over client-2's connection
    assert _code(lambda: upload(sb, task.job_id, task.round, 10, stolen)) == grpc.StatusCode.INVALID_ARGUMENT
    assert env.coordinator.state.updates("job1") == []


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
    me, stub = env.enroll("client-1")
    task, start = _start(env, me, stub)
    if kind in ("tampered", "wrong signature", "sealed for another round"):
        signer = Ed25519PrivateKey.generate() if kind == "wrong signature" else None
        envelope = _sealed(me, task, start, signer=signer, round_=1 if kind == "sealed for another round" else None)
        if kind == "tampered":
            envelope = envelope[:100] + bytes([envelope[100] ^ 1]) + envelope[101:]
    else:
        envelope = _sealed(me, task, _mutations(start)[kind])
    assert _code(lambda: upload(stub, task.job_id, task.round, 10, envelope)) == grpc.StatusCode.INVALID_ARGUMENT
    state = env.coordinator.state
    assert state.updates("job1") == [] and state.uploads("job1", 0) == []
    if kind in ("wrong shape", "missing tensor", "wrong dtype"):  # refused at BeginUpload if no valid update has
        refused_early = state.client(me.client_id).bytes_in == 0   # its size, else once every byte was in
        assert len(state.rejections("job1")) == (0 if refused_early else 1)
    else:  # refused once every byte was in, and recorded
        assert len(state.rejections("job1")) == 1


@pytest.mark.parametrize("job_id, round_", [("job1", 1), ("job1", 7), ("other-job", 0)])
def test_wrong_job_or_round_is_a_failed_precondition(env, job_id, round_):
    me, stub = env.enroll("client-1")
    task, start = _start(env, me, stub)
    envelope = seal(to_bytes(start), SealContext(job_id, round_, me.client_id, task.skeleton_digest), me.coordinator_key, me.signing_key)
    assert _code(lambda: upload(stub, job_id, round_, 10, envelope)) == grpc.StatusCode.FAILED_PRECONDITION
    assert env.coordinator.state.updates("job1") == []


def _parts(upload_id, envelope, start=0, end=None):
    end = len(envelope) if end is None else end
    return iter([pb.UploadPart(upload_id=upload_id, offset=at, data=bytes(envelope[at:min(at + CHUNK, end)]))
                 for at in range(start, end, CHUNK)])


def test_upload_that_lies_about_its_size_or_hash(env):
    me, stub = env.enroll("client-1")
    task, start = _start(env, me, stub)
    envelope = _sealed(me, task, start)

    def send(size, digest):
        session = stub.BeginUpload(pb.UploadHeader(job_id="job1", round=0, num_examples=5, size=size, sha256=digest))
        return stub.UploadChunks(_parts(session.upload_id, envelope))

    assert _code(lambda: send(len(envelope) - 1, hashlib.sha256(envelope).hexdigest())) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: send(len(envelope), "0" * 64)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: send(len(envelope), "not hex")) == grpc.StatusCode.INVALID_ARGUMENT
    garbage = bytearray(envelope)
    garbage[CHUNK : 2 * CHUNK] = bytes(CHUNK)  # a garbage chunk inside an upload with an honest header
    honest = pb.UploadHeader(job_id="job1", round=0, num_examples=5, size=len(envelope), sha256=hashlib.sha256(envelope).hexdigest())
    session = stub.BeginUpload(honest)
    assert _code(lambda: stub.UploadChunks(_parts(session.upload_id, bytes(garbage)))) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: stub.UploadChunks(iter([]))) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: stub.UploadChunks(iter([pb.UploadPart(upload_id="0" * 32, data=b"x")]))) == grpc.StatusCode.NOT_FOUND
    assert env.coordinator.state.updates("job1") == [] and env.coordinator.state.uploads("job1", 0) == []


def test_upload_resumes_from_the_durable_offset_and_counts_once(env):
    me, stub = env.enroll("client-1")
    task, start = _start(env, me, stub)
    envelope = _sealed(me, task, start)
    header = pb.UploadHeader(job_id="job1", round=0, num_examples=5, size=len(envelope), sha256=hashlib.sha256(envelope).hexdigest())
    session = stub.BeginUpload(header)
    assert (session.offset, session.chunk_size) == (0, CHUNK) and len(envelope) > 3 * CHUNK
    partial = stub.UploadChunks(_parts(session.upload_id, envelope, 0, 2 * CHUNK))  # then the client "dies"
    assert (partial.offset, partial.accepted) == (2 * CHUNK, False)
    again = stub.BeginUpload(header)  # a restarted client with the same sealed bytes finds its upload again
    assert (again.upload_id, again.offset) == (session.upload_id, 2 * CHUNK)
    wrong_offset = _parts(session.upload_id, envelope, CHUNK)
    assert _code(lambda: stub.UploadChunks(wrong_offset)) == grpc.StatusCode.FAILED_PRECONDITION
    (_, other_stub) = env.enroll("client-2")  # another client cannot write into this upload
    assert _code(lambda: other_stub.UploadChunks(_parts(session.upload_id, envelope, 2 * CHUNK))) == grpc.StatusCode.NOT_FOUND
    received_before = env.coordinator.state.client(me.client_id).bytes_in
    receipt = upload(stub, "job1", 0, 5, envelope)
    assert receipt.accepted and receipt.updates_in_round == 1
    assert env.coordinator.state.client(me.client_id).bytes_in - received_before == len(envelope) - 2 * CHUNK
    assert _code(lambda: upload(stub, "job1", 0, 5, envelope)) == grpc.StatusCode.ALREADY_EXISTS  # a replay
    assert len(env.coordinator.state.updates("job1")) == 1 and env.coordinator.state.uploads("job1", 0) == []
    assert not any(env.layout.uploads.iterdir())  # the spool is cleaned


def test_oversized_message_is_refused_by_the_transport(env):
    me, _ = env.enroll("client-1")
    creds = grpc.ssl_channel_credentials(env.layout.ca_cert.read_bytes(), me.tls_key_pem, me.certificate_pem)
    channel = grpc.secure_channel(env.target, creds, options=[("grpc.max_send_message_length", -1)])
    env.channels.append(channel)
    big = pb.UploadPart(upload_id="0" * 32, data=b"\0" * (MAX_MESSAGE_BYTES + 1))
    assert _code(lambda: pb_grpc.CoordinatorStub(channel).UploadChunks(iter([big]))) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert env.coordinator.state.client(me.client_id).bytes_in == 0


def test_download_fetches_only_missing_chunks_and_refuses_a_garbage_chunk(env):
    me, stub = env.enroll("client-1")
    task = stub.GetTask(pb.GetTaskRequest(job_id="job1"))
    blob = env.coordinator.blobs.open_path(task.adapter_sha256).read_bytes()
    dest = env.tmp / "adapter.safetensors"
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(blob[: 2 * CHUNK] + b"torn tail")  # what a client killed mid-download leaves
    sent_before = env.coordinator.state.client(me.client_id).bytes_out
    assert download_blob(stub, task.adapter_sha256, dest).read_bytes() == blob
    assert env.coordinator.state.client(me.client_id).bytes_out - sent_before == len(blob) - 2 * CHUNK

    class Tampering:  # a man in the middle that TLS would stop; the chunk manifest stops it too
        def __getattr__(self, name):
            return getattr(stub, name)

        def Download(self, request):
            for chunk in stub.Download(request):
                yield pb.Chunk(index=chunk.index, data=b"x" + chunk.data[1:]) if chunk.index == 1 else chunk

    with pytest.raises(IntegrityError, match="chunk 1"):
        download_blob(Tampering(), task.adapter_sha256, env.tmp / "again.safetensors")
    assert (env.tmp / "again.safetensors.part").stat().st_size == CHUNK  # only the verified chunk is kept
    assert download_blob(stub, task.adapter_sha256, env.tmp / "again.safetensors").read_bytes() == blob  # the rest

    class Consistent(Tampering):  # a chunk manifest that agrees with the bad chunk: the whole SHA-256 stops it
        def GetBlobInfo(self, request):
            info = stub.GetBlobInfo(request)
            info.chunk_sha256[1] = hashlib.sha256(b"x" + blob[CHUNK + 1 : 2 * CHUNK]).hexdigest()
            return info

    with pytest.raises(IntegrityError, match="although every chunk matches"):
        download_blob(Consistent(), task.adapter_sha256, env.tmp / "third.safetensors")
    assert not (env.tmp / "third.safetensors.part").exists()

    class Reordered(Tampering):
        def Download(self, request):
            got = list(stub.Download(request))
            yield from [got[1], got[0]] + got[2:]

    with pytest.raises(IntegrityError, match="chunk 1 .* arrived where chunk 0 belongs"):
        download_blob(Reordered(), task.adapter_sha256, env.tmp / "fourth.safetensors")


def test_heartbeat_records_activity_and_says_when_the_round_closed(env):
    clients = [env.enroll("client-1"), env.enroll("client-2")]
    me, stub = clients[0]
    beat = pb.HeartbeatRequest(job_id="job1", round=0, activity="training", progress=0.25)
    assert stub.Heartbeat(beat).round_open
    assert env.coordinator.state.client(me.client_id).activity == "training round 1 (25%)"
    for c, s_ in clients:
        task, start = _start(env, c, s_)
        upload(s_, task.job_id, task.round, 5, _sealed(c, task, start))
    _until(lambda: not stub.Heartbeat(beat).round_open)


def test_expired_token_is_refused(env):
    env.coordinator.state.add_token(hash_secret("stale-token"), "client-3", time.time() - 1)
    key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    request = pb.EnrollRequest(token="stale-token", signing_public_key=key, csr_pem=_csr())
    assert _code(lambda: env.anon.Enroll(request)) == grpc.StatusCode.UNAUTHENTICATED


def test_job_finishes_after_the_last_round(env):
    clients = [env.enroll("client-1"), env.enroll("client-2")]
    for round_ in range(2):
        for me, stub in clients:
            task, start = _start(env, me, stub)
            assert task.round == round_
            upload(stub, task.job_id, task.round, 5, _sealed(me, task, start))
    _until(lambda: env.finished == ["job1"])
    assert clients[0][1].GetTask(pb.GetTaskRequest(job_id="job1")).kind == pb.Task.DONE


def test_creating_an_existing_job_again_is_refused_before_any_build(env, tiny_model):
    from offsite.errors import AlreadyExistsError
    manifest = env.layout.jobs / "job1" / "bundle" / "offsite-manifest.json"
    before = manifest.stat().st_mtime_ns
    with pytest.raises(AlreadyExistsError):
        env.coordinator.create_job(JobConfig(job_id="job1", base_model=str(tiny_model), emulator_layers=1))
    assert manifest.stat().st_mtime_ns == before


def _details(call):
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details()


def test_hostile_numbers_and_strings_are_invalid_argument_on_the_wire_with_short_details(env):
    """One hostile field per RPC: INVALID_ARGUMENT (never UNKNOWN or INTERNAL), a detail that names the
    field and echoes at most a short prefix, and nothing stored or counted."""
    me, stub = env.enroll("client-1")
    task, start = _start(env, me, stub)
    huge = "x" * 10_000
    calls = {
        "Enroll": lambda: env.anon.Enroll(pb.EnrollRequest(token=huge)),
        "GetTask": lambda: stub.GetTask(pb.GetTaskRequest(job_id=huge)),
        "GetBlobInfo": lambda: stub.GetBlobInfo(pb.BlobInfoRequest(sha256=huge)),
        "Download": lambda: list(stub.Download(pb.DownloadRequest(sha256=task.adapter_sha256, first_chunk=2**32 - 1))),
        "BeginUpload (2^63 examples)": lambda: stub.BeginUpload(pb.UploadHeader(job_id="job1", num_examples=2**63, size=10,
                                                                              sha256="0" * 64)),
        "BeginUpload (10 KB job id)": lambda: stub.BeginUpload(pb.UploadHeader(job_id=huge, num_examples=1, size=10,
                                                                             sha256="0" * 64)),
        "UploadChunks": lambda: stub.UploadChunks(iter([pb.UploadPart(upload_id="0" * 32, offset=2**64 - 1)])),
        "Heartbeat": lambda: stub.Heartbeat(pb.HeartbeatRequest(job_id="job1", progress=float("nan"))),
        "SecAgg": lambda: stub.SecAgg(pb.SecAggRequest(job_id="job1", round=2**32 - 1)),
    }
    for what, call in calls.items():
        code, details = _details(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 200, (what, code, details[:300])
    state = env.coordinator.state
    assert state.updates("job1") == [] and state.uploads("job1", 0) == [] and state.rejections("job1") == []


def test_one_client_cannot_choose_the_global_adapter_by_its_example_count(env):
    """2^62 examples is refused by the wire, 10^9 by the job's max_examples_per_client; the most a client may
    claim (10^8) against another's 1000 still weighs only half: max_weight_share."""
    (a, sa), (b, sb) = env.enroll("client-1"), env.enroll("client-2")
    task, start = _start(env, a, sa)
    mine = _sealed(a, task, {k: v + 100.0 for k, v in start.items()})
    for claim, where in ((2**62, "UploadHeader.num_examples"), (10**9, "max_examples_per_client")):
        code, details = _details(lambda: upload(sa, task.job_id, task.round, claim, mine))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and where in details
    upload(sa, task.job_id, task.round, 10**8, mine)
    upload(sb, task.job_id, task.round, 1000, _sealed(b, task, {k: v + 2.0 for k, v in start.items()}))
    _, new = _start(env, a, sa)
    name = next(iter(start))
    assert torch.allclose(new[name], start[name] + 51.0, atol=1e-4)  # (100 + 2) / 2, not ~100


def _header(envelope, num_examples=5):
    return pb.UploadHeader(job_id="job1", round=0, num_examples=num_examples, size=len(envelope),
                           sha256=hashlib.sha256(envelope).hexdigest())


def test_sizes_no_sealed_update_can_have_are_refused_before_any_byte(env):
    me, stub = env.enroll("client-1")
    task, start = _start(env, me, stub)
    envelope = _sealed(me, task, start)
    for size in (0, 1, len(envelope) // 2, len(envelope) + 10_000, 1 << 30):
        code, details = _details(lambda: stub.BeginUpload(pb.UploadHeader(job_id="job1", num_examples=1, size=size,
                                                                          sha256="0" * 64)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and ("size" in details or "seals to" in details), (size, details)
    assert env.coordinator.state.uploads("job1", 0) == [] and not any(env.layout.uploads.iterdir())
    stub.BeginUpload(_header(envelope))  # the real size opens


def test_a_client_holds_one_upload_per_round_a_new_header_replaces_the_old(env):
    me, stub = env.enroll("client-1")
    task, start = _start(env, me, stub)
    first = _sealed(me, task, start)
    old = stub.BeginUpload(_header(first))
    stub.UploadChunks(_parts(old.upload_id, first, 0, CHUNK))
    for _ in range(50):  # distinct headers of the right size, each fed a part: still one upload, one part's bytes
        fake = bytes(len(first) - 1) + bytes([_ % 251])
        s = stub.BeginUpload(_header(fake))
        stub.UploadChunks(_parts(s.upload_id, fake, 0, CHUNK))
    state = env.coordinator.state
    assert len(state.client_uploads(me.client_id)) == 1 and state.upload_bytes(me.client_id) == len(first)
    assert sum(p.stat().st_size for p in env.layout.uploads.iterdir()) == CHUNK
    resealed = _sealed(me, task, start)  # what a client that crashed after sealing sends next: new bytes, new header
    assert _code(lambda: stub.UploadChunks(_parts(old.upload_id, first, CHUNK))) == grpc.StatusCode.NOT_FOUND
    receipt = upload(stub, "job1", 0, 5, resealed)
    assert receipt.accepted and state.uploads("job1", 0) == [] and not any(env.layout.uploads.iterdir())


def test_spool_quotas_per_client_and_in_total(env):
    from offsite.cloud.limits import Limits
    (a, sa), (b, sb) = env.enroll("client-1"), env.enroll("client-2")
    task, start = _start(env, a, sa)
    ea, eb = _sealed(a, task, start), _sealed(b, task, start)
    env.coordinator.limits = Limits(spool_bytes_per_client=len(ea) - 1)
    code, details = _details(lambda: sa.BeginUpload(_header(ea)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "spool_bytes_per_client" in details
    env.coordinator.limits = Limits(spool_bytes=len(ea) + len(eb) // 2)
    sa.BeginUpload(_header(ea))
    code, details = _details(lambda: sb.BeginUpload(_header(eb)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "spool_bytes" in details
    upload(sa, "job1", 0, 5, ea)  # a's upload completes and leaves the spool: b's fits now
    assert upload(sb, "job1", 0, 5, eb).accepted


def test_an_upload_with_no_new_part_expires(env):
    import os
    me, stub = env.enroll("client-1")
    task, start = _start(env, me, stub)
    envelope = _sealed(me, task, start)
    session = stub.BeginUpload(_header(envelope))
    stub.UploadChunks(_parts(session.upload_id, envelope, 0, 2 * CHUNK))
    c = env.coordinator
    c.intake._next_sweep = 0.0
    assert c.expire_uploads() == 0  # fresh
    (part,) = env.layout.uploads.iterdir()
    stale = time.time() - c.limits.upload_idle_s - 1
    os.utime(part, (stale, stale))
    c.intake._next_sweep = 0.0
    assert c.expire_uploads() == 1 and c.state.uploads("job1", 0) == [] and not part.exists()
    assert _code(lambda: stub.UploadChunks(_parts(session.upload_id, envelope, 2 * CHUNK))) == grpc.StatusCode.NOT_FOUND
    assert stub.BeginUpload(_header(envelope)).offset == 0  # the client starts that upload over


def test_the_enrollment_port_caps_connections_without_touching_the_mutual_tls_port(env):
    """Strangers holding every enrollment connection neither reach the mutual-TLS port's clients nor get a
    fourth connection; their idle Enroll calls are cut at request_timeout_s."""
    import asyncio
    from offsite.cloud.limits import Limits
    me, _ = env.enroll("client-1")
    running = start_server(env.coordinator, env.layout, "127.0.0.1:0", "127.0.0.1:0",
                           Limits(enroll_connections=3, request_timeout_s=2.0))
    ca = env.layout.ca_cert.read_bytes()

    async def never():
        await asyncio.Event().wait()
        yield pb.EnrollRequest()

    async def hold():
        def channel():
            return grpc.aio.secure_channel(f"localhost:{running.enroll_port}", grpc.ssl_channel_credentials(ca),
                                           options=[("grpc.use_local_subchannel_pool", 1)])
        held = [channel() for _ in range(3)]
        calls = [ch.stream_unary("/offsite.v1.Coordinator/Enroll", pb.EnrollRequest.SerializeToString,
                                 pb.EnrollResponse.FromString)(never()) for ch in held]
        await asyncio.sleep(0.5)
        fourth = channel()
        try:
            await fourth.unary_unary("/offsite.v1.Coordinator/Enroll", pb.EnrollRequest.SerializeToString,
                                     pb.EnrollResponse.FromString)(pb.EnrollRequest(token="t"), timeout=2)
            refused = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            refused = e.code()
        main = grpc.secure_channel(f"localhost:{running.port}", grpc.ssl_channel_credentials(ca, me.tls_key_pem, me.certificate_pem))
        task = pb_grpc.CoordinatorStub(main).GetTask(pb.GetTaskRequest(job_id="job1"), timeout=2)
        main.close()
        cut = [e.code() for e in await asyncio.gather(*calls, return_exceptions=True)]
        for ch in held + [fourth]:
            await ch.close()
        return refused, task, cut

    try:
        refused, task, cut = asyncio.run(hold())
    finally:
        running.stop(None)
    assert refused in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)  # no fourth connection
    assert task.kind == pb.Task.TRAIN
    assert cut == [grpc.StatusCode.DEADLINE_EXCEEDED] * 3
