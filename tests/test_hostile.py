"""Hostile enrolled clients and strangers against a real coordinator process over loopback mutual TLS.

- Idle calls cannot freeze it: while 200 calls are held open on each port without moving (unary requests
  that never arrive, upload streams that never send a part, downloads never read), an honest client's
  GetTask answers within 1 s, a full download and upload within 10 s, the health check and a new
  enrollment answer; the idle calls are cut at their deadline; memory stays bounded. Before the gRPC edge
  moved to asyncio, 16 such calls froze it.
- Uploads cannot claim its disk: 300 distinct headers from one client hold one upload; sizes no sealed
  update can have are refused; the spool's total quota holds; idle uploads expire and free it."""
import asyncio
import hashlib
import json
import subprocess
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from offsite.client.identity import enroll
from offsite.client.transfer import download_blob, upload
from offsite.cloud.coordinator import Coordinator
from offsite.cloud.identity import StateLayout, init_state
from offsite.cloud.job import JobConfig
from offsite.protos.offsite.v1 import coordinator_pb2 as pb
from offsite.protos.offsite.v1 import coordinator_pb2_grpc as pb_grpc
from offsite.sealing import SealContext, seal
from offsite.transport import CHANNEL_OPTIONS, secure_channel
from offsite.demo.tiny import make_tiny_model
from tests.procs import offsite

ATTACKERS, CUT_S = 25, 3.0      # 25 enrolled identities x 8 calls (calls_per_client) on the mutual-TLS port
ENROLL_CONNECTIONS = 50         # x 4 streams (enroll_streams_per_connection) on the enrollment port
SERVICE = "/offsite.v1.Coordinator/"
SPOOL_BYTES, IDLE_UPLOAD_S = 100_000_000, 2.0   # room for 4 of this job's 21 MB updates; idle ones expire fast


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _metric(url: str, name: str, **labels) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"no sample {name} {labels}")


async def _never():
    await asyncio.Event().wait()
    yield pb.GetTaskRequest()  # never reached


def _aio_channel(target: str, ca: bytes, key: bytes | None = None, cert: bytes | None = None):
    creds = grpc.ssl_channel_credentials(ca, key, cert)
    return grpc.aio.secure_channel(target, creds, options=CHANNEL_OPTIONS + [("grpc.use_local_subchannel_pool", 1)])


def _wait_for(read, expected, timeout_s: float = 20.0):
    """`read()` once it equals `expected`, or its last value after `timeout_s`."""
    deadline = time.time() + timeout_s
    while (value := read()) != expected and time.time() < deadline:
        time.sleep(0.2)
    return value


@pytest.fixture(scope="module")
def coordinator_process(tmp_path_factory):
    """One coordinator for the module's tests; each test enrolls identities of its own, and the round stays
    open throughout (clients_per_round is more than all of them)."""
    tmp_path = tmp_path_factory.mktemp("hostile")
    base = make_tiny_model(tmp_path / "base", num_layers=6, hidden_size=384)  # a 21 MB adapter: 21 chunks
    state = tmp_path / "state"
    names = (["honest", "late", "honest-2"] + [f"attacker-{i}" for i in range(ATTACKERS)]
             + [f"squatter-{i}" for i in range(5)])
    init_state(state, names, ["localhost", "127.0.0.1"], 3600)
    Coordinator.open(state).create_job(JobConfig(job_id="j", base_model=str(base), emulator_layers=1, rounds=2,
                                                 clients_per_round=len(names)))
    limits = [a for name, value in (("request_timeout_s", CUT_S), ("part_timeout_s", CUT_S), ("send_timeout_s", CUT_S),
                                    ("spool_bytes", SPOOL_BYTES), ("upload_idle_s", IDLE_UPLOAD_S))
              for a in ("--limit", f"{name}={value}")]
    proc = subprocess.Popen(offsite("cloud", "serve", "--state", str(state), "--address", "127.0.0.1:0",
                                    "--http-address", "127.0.0.1:0", "--port-file", str(tmp_path / "ports"), *limits))
    try:
        deadline = time.time() + 60
        while not (tmp_path / "ports").exists():
            assert proc.poll() is None and time.time() < deadline, "coordinator did not start"
            time.sleep(0.1)
        yield state, json.loads((tmp_path / "ports").read_text()), proc
    finally:
        proc.kill()
        proc.wait()


def test_idle_calls_on_both_ports_neither_freeze_nor_fill_the_coordinator(coordinator_process, tmp_path):
    state, ports, proc = coordinator_process
    ca = (state / "tls" / "ca.pem").read_bytes()
    main, enroll_at, web = f"localhost:{ports['port']}", f"localhost:{ports['enroll_port']}", f"http://127.0.0.1:{ports['http_port']}"
    token = lambda name: (state / "tokens" / f"{name}.token").read_text().strip()  # noqa: E731

    with secure_channel(enroll_at, state / "tls" / "ca.pem") as ch:
        anon = pb_grpc.CoordinatorStub(ch)
        honest = enroll(anon, token("honest"), tmp_path / "honest")
        attackers = [enroll(anon, token(f"attacker-{i}"), tmp_path / f"attacker-{i}") for i in range(ATTACKERS)]
    honest_channel = secure_channel(main, state / "tls" / "ca.pem", honest.tls_key_pem, honest.certificate_pem)
    stub = pb_grpc.CoordinatorStub(honest_channel)
    task = stub.GetTask(pb.GetTaskRequest(job_id="j"))
    rss_before = _rss_mib(proc.pid)

    def timed(fn):
        t = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - t

    def honest_work():
        """What an honest client and an operator do while the attack holds."""
        with secure_channel(enroll_at, state / "tls" / "ca.pem") as ch:
            health = health_pb2_grpc.HealthStub(ch).Check
            _, health_s = timed(lambda: health(health_pb2.HealthCheckRequest(service="offsite.v1.Coordinator"), timeout=5))
            _, enroll_s = timed(lambda: enroll(pb_grpc.CoordinatorStub(ch), token("late"), tmp_path / "late"))
        get_task_s = max(timed(lambda: stub.GetTask(pb.GetTaskRequest(job_id="j"), timeout=5))[1] for _ in range(5))

        def full_round_trip():
            adapter = download_blob(stub, task.adapter_sha256, tmp_path / "adapter.safetensors").read_bytes()
            envelope = seal(adapter, SealContext("j", 0, honest.client_id, task.skeleton_digest), honest.coordinator_key,
                            honest.signing_key)
            return upload(stub, "j", 0, 10, envelope), len(adapter)
        (receipt, adapter_bytes), transfer_s = timed(full_round_trip)
        return {"health_s": health_s, "enroll_s": enroll_s, "get_task_s": get_task_s, "transfer_s": transfer_s,
                "accepted": receipt.accepted, "adapter_bytes": adapter_bytes}

    async def attack():
        channels, unary, downloads = [], [], []
        for me in attackers:
            ch = _aio_channel(main, ca, me.tls_key_pem, me.certificate_pem)
            channels.append(ch)
            for _ in range(3):  # requests that never arrive
                unary.append(ch.stream_unary(SERVICE + "GetTask", pb.GetTaskRequest.SerializeToString, pb.Task.FromString)(_never()))
            for _ in range(3):  # upload streams that never send a part
                unary.append(ch.stream_unary(SERVICE + "UploadChunks", pb.UploadPart.SerializeToString,
                                             pb.UploadResult.FromString)(_never()))
            for _ in range(2):  # downloads never read
                downloads.append(ch.unary_stream(SERVICE + "Download", pb.DownloadRequest.SerializeToString, pb.Chunk.FromString)(
                    pb.DownloadRequest(sha256=task.adapter_sha256)))
        for _ in range(ENROLL_CONNECTIONS):
            ch = _aio_channel(enroll_at, ca)
            channels.append(ch)
            unary.extend(ch.stream_unary(SERVICE + "Enroll", pb.EnrollRequest.SerializeToString,
                                         pb.EnrollResponse.FromString)(_never()) for _ in range(4))
        held, waited = 0.0, time.perf_counter()  # the most held at once, before the first are cut (a loaded machine
        while held < 2 * 200 and time.perf_counter() - waited < CUT_S:  # takes a while to open 75 channels)
            await asyncio.sleep(0.1)
            held = max(held, await asyncio.to_thread(_metric, web, "offsite_calls_in_flight"))
        rss_during = _rss_mib(proc.pid)
        ninth = channels[0].unary_unary(SERVICE + "GetTask", pb.GetTaskRequest.SerializeToString, pb.Task.FromString)
        try:
            await ninth(pb.GetTaskRequest(job_id="j"), timeout=5)
            ninth_code = grpc.StatusCode.OK
        except grpc.aio.AioRpcError as e:
            ninth_code = e.code()
        work = await asyncio.to_thread(honest_work)
        codes = [e.code() if isinstance(e, grpc.aio.AioRpcError) else e
                 for e in await asyncio.gather(*(asyncio.wait_for(c, CUT_S + 10) for c in unary), return_exceptions=True)]
        expected_cut = {"request_timeout": ATTACKERS * 3 + ENROLL_CONNECTIONS * 4, "part_timeout": ATTACKERS * 3,
                        "send_timeout": ATTACKERS * 2}  # a download is cut send_timeout_s after it stalls: a while
        cut = await asyncio.to_thread(_wait_for, lambda: {r: _metric(web, "offsite_calls_refused_total", reason=r)
                                                          for r in expected_cut}, expected_cut)
        again = []  # the attackers try to pin more: their stalled downloads still hold their download slots
        for ch in channels[:ATTACKERS]:
            call = ch.unary_stream(SERVICE + "Download", pb.DownloadRequest.SerializeToString, pb.Chunk.FromString)(
                pb.DownloadRequest(sha256=task.adapter_sha256))
            try:
                await asyncio.wait_for(call.read(), 5)
                again.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as e:
                again.append(e.code())
        after = {"in_flight": _metric(web, "offsite_calls_in_flight"), "rss": _rss_mib(proc.pid), "again": set(again)}
        for ch in channels:  # the attackers go away
            await ch.close()
        after["in_flight_gone"] = await asyncio.to_thread(_wait_for, lambda: _metric(web, "offsite_calls_in_flight"), 0)
        return held, rss_during, ninth_code, work, codes, cut, after

    started = time.perf_counter()
    held, rss_during, ninth_code, work, codes, cut, after = asyncio.run(attack())
    honest_channel.close()
    print(f"\nidle calls held {held:.0f}; honest: {work}; rss MiB before {rss_before:.0f}, during {rss_during:.0f}, "
          f"after {after['rss']:.0f}; cut {cut}; all in {time.perf_counter() - started:.1f} s")
    assert held >= 2 * 200  # every idle call reached the coordinator and was held, not refused
    assert ninth_code == grpc.StatusCode.RESOURCE_EXHAUSTED  # a 9th call of one client
    assert work["get_task_s"] < 1.0 and work["health_s"] < 1.0 and work["enroll_s"] < 2.0
    assert work["transfer_s"] < 10.0 and work["accepted"] and work["adapter_bytes"] > 20 << 20
    assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * (ATTACKERS * 6 + ENROLL_CONNECTIONS * 4)
    assert cut == {"request_timeout": ATTACKERS * 3 + ENROLL_CONNECTIONS * 4, "part_timeout": ATTACKERS * 3,
                   "send_timeout": ATTACKERS * 2}  # every idle call was cut
    # every call is timed, the cut ones too: the honest client's 5 GetTasks and more, each attacker's 3 idle uploads
    assert _metric(web, "offsite_call_seconds_count", method="GetTask") >= 5 + ATTACKERS * 3
    assert _metric(web, "offsite_call_seconds_count", method="UploadChunks") >= ATTACKERS * 3
    # a cut download whose client reads nothing keeps the chunk in flight until that client goes away (gRPC
    # cannot cancel a send), and keeps its slot: one client can pin at most calls_per_client of them. A few may
    # end sooner (the client's transport took the chunk into its own buffers after the cut: 48-49 of 50 in about
    # one run in four on 2 cores), never more than were pinned, and none outlives its client
    assert ATTACKERS * 2 - 5 <= after["in_flight"] <= ATTACKERS * 2 and after["in_flight_gone"] == 0
    assert after["again"] == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    # each pinned download holds its chunk and transport buffers (about 6 MiB measured with 1 MiB chunks)
    assert rss_during - rss_before < ATTACKERS * 2 * 10 and after["rss"] - rss_before < ATTACKERS * 2 * 10 + 100


def test_uploads_cannot_claim_the_disk(coordinator_process, tmp_path):
    state, ports, proc = coordinator_process
    main, enroll_at = f"localhost:{ports['port']}", f"localhost:{ports['enroll_port']}"
    ca = state / "tls" / "ca.pem"
    with secure_channel(enroll_at, ca) as ch:
        anon = pb_grpc.CoordinatorStub(ch)
        names = ["honest-2"] + [f"squatter-{i}" for i in range(5)]
        ids = {n: enroll(anon, (state / "tokens" / f"{n}.token").read_text().strip(), tmp_path / n) for n in names}
    channels = {n: secure_channel(main, ca, me.tls_key_pem, me.certificate_pem) for n, me in ids.items()}
    stubs = {n: pb_grpc.CoordinatorStub(c) for n, c in channels.items()}
    task = stubs["honest-2"].GetTask(pb.GetTaskRequest(job_id="j"))
    adapter = download_blob(stubs["honest-2"], task.adapter_sha256, tmp_path / "adapter.safetensors").read_bytes()
    honest = ids["honest-2"]
    envelope = seal(adapter, SealContext("j", 0, honest.client_id, task.skeleton_digest), honest.coordinator_key, honest.signing_key)
    size = len(envelope)

    def header(digest: str, size_: int = size) -> pb.UploadHeader:
        return pb.UploadHeader(job_id="j", round=0, num_examples=10, size=size_, sha256=digest)

    def code(call) -> grpc.StatusCode:
        try:
            call()
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()

    attacker = stubs["squatter-0"]
    part = b"\0" * 4096
    in_progress = Coordinator.open(state).state  # the coordinator's own database, read beside it
    for i in range(300):  # a distinct header each, each fed a part: every new one replaces the last
        session = attacker.BeginUpload(header(hashlib.sha256(str(i).encode()).hexdigest()))
        attacker.UploadChunks(iter([pb.UploadPart(upload_id=session.upload_id, offset=0, data=part)]))
    spool = list((state / "uploads").iterdir())
    assert len(in_progress.uploads("j", 0)) == 1
    assert len(spool) == 1 and spool[0].stat().st_size == len(part)
    for bad in (0, 1 << 30, size // 2):  # no sealed update of this job has these sizes
        assert code(lambda: attacker.BeginUpload(header("0" * 64, bad))) == grpc.StatusCode.INVALID_ARGUMENT
    for n in ("squatter-1", "squatter-2", "squatter-3"):  # 4 x 21 MB claimed: the spool's quota is 100 MB
        stubs[n].BeginUpload(header("1" * 64))
    assert code(lambda: stubs["squatter-4"].BeginUpload(header("1" * 64))) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert code(lambda: upload(stubs["honest-2"], "j", 0, 10, envelope)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # the held uploads get no part: they expire (swept every upload_idle_s / 10) and free the spool
    assert _wait_for(lambda: len(in_progress.uploads("j", 0)), 0, IDLE_UPLOAD_S + 5) == 0
    assert not any((state / "uploads").iterdir())
    assert upload(stubs["honest-2"], "j", 0, 10, envelope).accepted
    for c in channels.values():
        c.close()
