"""Fault injection with real processes over loopback TLS: kill -9 at named points (offsite.failpoints),
restart with the same command, and check nothing accepted is lost and nothing is counted twice."""
import hashlib
import json
import signal
import subprocess
import threading
import time

from offsite.client.identity import enroll
from offsite.client.transfer import download_blob
from offsite.cloud.coordinator import Coordinator
from offsite.cloud.identity import StateLayout, init_state
from offsite.cloud.job import JobConfig
from offsite.protos.offsite.v1 import coordinator_pb2 as pb
from offsite.protos.offsite.v1 import coordinator_pb2_grpc as pb_grpc
from offsite.sealing import SealContext, seal
from offsite.transport import secure_channel
from offsite.demo import domain
from tests.procs import client, free_port, offsite, serve, wait_serving

CHUNK_KIB = ("--chunk-kib", "4")  # small chunks: the tiny model's blobs span many, so a kill lands mid-transfer


def make_job(tmp_path, tiny_model, names, **job):
    state = tmp_path / "state"
    init_state(state, names, ["localhost", "127.0.0.1"], 3600)
    layout = StateLayout(state)
    coordinator = Coordinator.open(layout.root)
    coordinator.create_job(JobConfig(job_id="faults", base_model=str(tiny_model), emulator_layers=1, batch_size=8, **job))
    return state


def status(state):
    out = subprocess.run(offsite("cloud", "status", "--state", str(state), "--json"), check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def test_kill_9_of_coordinator_and_clients_mid_transfer(tiny_model, client_data, tmp_path):
    """Client 1 dies mid-download and, started again, mid-training; client 2 dies mid-upload; the coordinator right after accepting the first
    update (before its reply goes out) and, started again, in the middle of closing the round (the new
    adapter written, the job not yet moved on). Each is started again with the same command."""
    state = make_job(tmp_path, tiny_model, ["client-1", "client-2"], rounds=2, clients_per_round=2)
    port, enroll_port = free_port(), free_port()
    coordinator_faults = ["cloud.update.accepted=1", "cloud.round.closing=1", ""]  # one per coordinator run
    procs = {"coordinator": serve(state, port, enroll_port, coordinator_faults.pop(0), CHUNK_KIB + ("--exit-when-done",))}
    client_faults = {"client-1": ["client.download.chunk=3", "client.train.step=3", ""], "client-2": ["client.upload.call=1", ""]}
    killed, logs, deadline = [], {name: "" for name in client_faults}, time.time() + 300

    def start_client(name):
        data = next(f for f in client_data if f.name == name)
        return client(state, port, enroll_port, data, tmp_path / name, name, client_faults[name].pop(0), ("--checkpoint-every", "2"))

    try:
        wait_serving(state, enroll_port, procs["coordinator"])
        for f in client_data:
            procs[f.name] = start_client(f.name)
        while any(p.poll() is None for p in procs.values()) or procs["coordinator"].returncode != 0:
            assert time.time() < deadline, f"the job did not finish; killed so far: {killed}"
            for name, p in list(procs.items()):
                if p.poll() is None:
                    continue
                if name != "coordinator":
                    logs[name] += p.stderr.read()
                if p.returncode == -signal.SIGKILL:  # a failpoint fired: start again, with the next one armed
                    killed.append(name)
                    if name == "coordinator":
                        procs[name] = serve(state, port, enroll_port, coordinator_faults.pop(0), CHUNK_KIB + ("--exit-when-done",))
                    else:
                        procs[name] = start_client(name)
                else:
                    assert p.returncode == 0, f"{name} exited with {p.returncode}:\n{logs.get(name, '')[-3000:]}"
            time.sleep(0.2)
    finally:  # a failed assertion must not leave processes behind
        for p in procs.values():
            p.kill()
    assert sorted(killed) == ["client-1", "client-1", "client-2", "coordinator", "coordinator"]
    assert "chunks already here" in logs["client-1"]          # the restarted download kept its verified chunks
    assert "resuming training at step 2" in logs["client-1"]  # the restarted training went on from its checkpoint
    assert "resuming upload at byte" in logs["client-2"]      # the restarted upload went on from the durable offset
    assert "already accepted before a restart" in logs["client-1"] + logs["client-2"]  # the reply the crash ate
    job = status(state)["jobs"][0]
    assert job["status"] == "done"
    assert sorted((u["round"], u["client_id"].rsplit("-", 1)[0]) for u in job["updates"]) == \
        [(1, "client-1"), (1, "client-2"), (2, "client-1"), (2, "client-2")]  # every update once, none lost
    assert (state / "jobs" / "faults" / "report.json").is_file()
    for c in status(state)["clients"]:  # the operator's view: bytes moved each way, last activity
        assert c["bytes_out"] > 0 and c["bytes_in"] > 0 and c["activity"]


def test_sigterm_drains_an_in_flight_upload_and_health_reports_serving(tiny_model, tmp_path):
    state = make_job(tmp_path, tiny_model, ["client-1"], rounds=1, clients_per_round=1)
    port, enroll_port = free_port(), free_port()
    coordinator = serve(state, port, enroll_port, "", CHUNK_KIB)
    try:
        result, me = _upload_across_sigterm(state, port, enroll_port, coordinator, tmp_path)
        assert coordinator.wait(timeout=60) == 0
    finally:
        coordinator.kill()
    assert result.accepted and result.updates_in_round == 1  # the drain let the upload finish
    assert [u["client_id"] for u in status(state)["jobs"][0]["updates"]] == [me.client_id]


def _upload_across_sigterm(state, port, enroll_port, coordinator, tmp_path):
    wait_serving(state, enroll_port, coordinator)  # the health service says SERVING
    with secure_channel(f"localhost:{enroll_port}", state / "tls" / "ca.pem") as anon:
        me = enroll(pb_grpc.CoordinatorStub(anon), (state / "tokens" / "client-1.token").read_text().strip(), tmp_path / "me")
    with secure_channel(f"localhost:{port}", state / "tls" / "ca.pem", me.tls_key_pem, me.certificate_pem) as channel:
        stub = pb_grpc.CoordinatorStub(channel)
        task = stub.GetTask(pb.GetTaskRequest(job_id="faults"))
        adapter = download_blob(stub, task.adapter_sha256, tmp_path / "adapter.safetensors").read_bytes()
        envelope = seal(adapter, SealContext("faults", 0, me.client_id, task.skeleton_digest), me.coordinator_key, me.signing_key)
        session = stub.BeginUpload(pb.UploadHeader(job_id="faults", round=0, num_examples=3, size=len(envelope),
                                                   sha256=hashlib.sha256(envelope).hexdigest()))
        half, terminated = len(envelope) // 2, threading.Event()

        def parts():
            yield pb.UploadPart(upload_id=session.upload_id, offset=0, data=bytes(envelope[:half]))
            coordinator.send_signal(signal.SIGTERM)  # the coordinator is told to stop mid-upload...
            terminated.set()
            time.sleep(2.5)  # ...and has begun its drain (it checks for the signal every second)
            yield pb.UploadPart(upload_id=session.upload_id, offset=half, data=bytes(envelope[half:]))

        result = stub.UploadChunks(parts(), timeout=60)
    assert terminated.is_set()
    return result, me



def test_kill_9_of_a_client_mid_secure_aggregation_leaves_the_round_to_the_others(tiny_model, client_data, tmp_path):
    """Three clients; one dies after sharing its keys, before masking. The two others still finish the
    run (t = 2): the coordinator rebuilds the dead one's mask key from their shares."""
    data = domain.write_clients(tmp_path / "data", n_clients=3, n_train=20, n_heldout=5)
    state = make_job(tmp_path, tiny_model, ["client-1", "client-2", "client-3"], rounds=1, clients_per_round=3,
                     secure_aggregation=True, secagg_timeout_s=5)
    port, enroll_port = free_port(), free_port()
    server, procs = serve(state, port, enroll_port, "", ("--exit-when-done",)), {}
    try:
        wait_serving(state, enroll_port, server)
        procs = {f.name: client(state, port, enroll_port, f, tmp_path / f.name, f.name,
                                "client.secagg.shared=1" if f.name == "client-2" else "") for f in data}
        assert procs["client-2"].wait(timeout=240) == -signal.SIGKILL
        for name in ("client-1", "client-3"):
            _, err = procs[name].communicate(timeout=240)
            assert procs[name].returncode == 0, err
        assert server.wait(timeout=120) == 0
    finally:
        server.kill()
        for p in procs.values():
            p.kill()
    report = json.loads((state / "jobs" / "faults" / "report.json").read_text())
    assert [c["id"] for c in report["clients"]] == ["client-1", "client-3"] and report["rejected_updates"] == []
    adapters = StateLayout(state).open_state().global_adapters("faults")
    assert len(adapters) == 2 and adapters[1] != adapters[0]  # closed with the two survivors' sum, not aborted


def test_kill_9_mid_round_keeps_the_sampled_clients_selected(tiny_model, tmp_path):
    """Two of three clients are sampled for round 1; the coordinator is killed right after the first of
    their updates is accepted. Started again, the same two stay selected (the rounds table, not memory,
    holds them), the third is still told to wait, and each selected update counts once."""
    data = domain.write_clients(tmp_path / "data", n_clients=3, n_train=24, n_heldout=4)
    names = [f.name for f in data]
    state = make_job(tmp_path, tiny_model, names, rounds=2, clients_per_round=2, min_clients=2)
    port, enroll_port = free_port(), free_port()
    procs = {"coordinator": serve(state, port, enroll_port, "cloud.update.accepted=1", ("--exit-when-done",))}
    try:
        wait_serving(state, enroll_port, procs["coordinator"])
        for f in data:
            procs[f.name] = client(state, port, enroll_port, f, tmp_path / f.name, f.name)
        assert procs["coordinator"].wait(timeout=240) == -signal.SIGKILL
        rounds = Coordinator.open(state).state
        before, accepted = rounds.round("faults", 0).selected, [u.client_id for u in rounds.updates("faults", 0)]
        assert len(before) == 2 and len(accepted) == 1 and accepted[0] in before
        procs["coordinator"] = serve(state, port, enroll_port, "", ("--exit-when-done",))
        logs = {}
        for name in names:
            _, logs[name] = procs[name].communicate(timeout=240)
            assert procs[name].returncode == 0, f"{name} exited with {procs[name].returncode}:\n{logs[name][-3000:]}"
        assert procs["coordinator"].wait(timeout=60) == 0
    finally:
        for p in procs.values():
            p.kill()
    rounds = Coordinator.open(state).state
    assert rounds.round("faults", 0).selected == before  # the restart did not sample again
    assert sorted(u.client_id for u in rounds.updates("faults", 0)) == sorted(before)  # each once, only the sampled
    assert status(state)["jobs"][0]["status"] == "done"
