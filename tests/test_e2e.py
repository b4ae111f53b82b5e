"""End to end: the coordinator and clients as real processes over loopback mutual TLS."""
import json
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM

from offsite.cloud.privacy import DPConfig, epsilon
from offsite.demo import domain
from tests.procs import offsite, run_clients, serve_until_done


def run_job(tmp_path, tiny_model, client_data, names, job_extra="", during=None):
    """Init a coordinator for `names`, run one job with the clients of `client_data` (and `during(state, ports)`
    run meanwhile in this process, e.g. a hostile client); return (state, report)."""
    state = tmp_path / "state"
    subprocess.run(offsite("cloud", "init", "--state", str(state), "--clients", ",".join(names)), check=True)
    sets = ", ".join(f'"{f.name}" = "{f / "heldout.jsonl"}"' for f in client_data)
    tasks = ", ".join(f'"{f.name}" = "{f / "heldout_task.jsonl"}"' for f in client_data if (f / "heldout_task.jsonl").exists())
    (tmp_path / "job.toml").write_text(f'[job]\nid = "e2e"\nbase_model = "{tiny_model}"\n{job_extra}'
                                       f'[split]\nemulator_layers = 1\n[training]\nbatch_size = 8\n'
                                       f'[eval]\nsets = {{ {sets} }}\ntasks = {{ {tasks} }}\n')
    subprocess.run(offsite("cloud", "jobs", "create", "--state", str(state), "--config", str(tmp_path / "job.toml")), check=True)
    server, ports = serve_until_done(state, tmp_path / "port")
    try:
        clients = run_clients(state, ports, client_data, tmp_path)
        if during is not None:
            during(state, ports)
        for c in clients:
            _, err = c.communicate(timeout=180)
            assert c.returncode == 0, err
        assert server.wait(timeout=120) == 0
    finally:
        server.kill()
    return state, json.loads((state / "jobs" / "e2e" / "report.json").read_text())


def test_one_round_over_mutual_tls_with_real_processes_and_a_hostile_client(tiny_model, client_data, tmp_path):
    """Two real clients train; a third, hostile one (the project's own client code, its update scaled far
    off) uploads start + 5 everywhere. With combine = "median" the next global adapter stays between the
    honest proposals; FedAvg over the same stored updates (computed here) is pulled 5/3 towards the attacker."""
    from offsite.client.identity import enroll
    from offsite.client.transfer import download_blob, upload
    from offsite.cloud.aggregate import WeightedMean
    from offsite.cloud.blobs import BlobStore
    from offsite.protos.offsite.v1 import coordinator_pb2 as pb
    from offsite.protos.offsite.v1 import coordinator_pb2_grpc as pb_grpc
    from offsite.sealing import SealContext, seal
    from offsite.tensors import from_bytes, load_blob, to_bytes
    from offsite.transport import secure_channel

    def attack(state, ports):
        ca = state / "tls" / "ca.pem"
        with secure_channel(f"localhost:{ports['enroll_port']}", ca) as ch:
            me = enroll(pb_grpc.CoordinatorStub(ch), (state / "tokens" / "attacker.token").read_text().strip(), tmp_path / "attacker")
        with secure_channel(f"localhost:{ports['port']}", ca, me.tls_key_pem, me.certificate_pem) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            task = stub.GetTask(pb.GetTaskRequest(job_id="e2e"))
            start = from_bytes(download_blob(stub, task.adapter_sha256, tmp_path / "start.safetensors").read_bytes())
            scaled = {k: v + 5.0 for k, v in start.items()}
            envelope = seal(to_bytes(scaled), SealContext("e2e", 0, me.client_id, task.skeleton_digest), me.coordinator_key,
                            me.signing_key)
            assert upload(stub, "e2e", 0, 40, envelope).accepted

    state, report = run_job(tmp_path, tiny_model, client_data, ["client-1", "client-2", "attacker"],
                            'rounds = 1\nclients_per_round = 3\ntrain_extra = ["norm"]\n[aggregation]\ncombine = "median"\n',
                            during=attack)
    assert [(c["id"], c["rounds_participated"]) for c in report["clients"]] == [("attacker", 1), ("client-1", 1), ("client-2", 1)]
    assert all(c["upload_bytes"] > 0 and c["train_examples"] == 40 for c in report["clients"])
    assert report["transport"] == {"tls": True, "sealed_updates": True}
    assert set(report["eval"]) == {"all", "client-1", "client-2"}
    accuracy = report["task_accuracy"]  # exact match on the held-out match results, for every model the job compares
    assert set(accuracy) == {"all", "client-1", "client-2"}
    assert all(set(row) == {"full_zero_shot", "emulator_zero_shot", "emulator_with_adapter", "plug_in"}
               and all(0.0 <= v <= 1.0 for v in row.values()) for row in accuracy.values())
    assert report["emulator"] == {"strategy": "uniform", "shared": False, "attn_rank": None, "quantized": None,
                                  "distill_steps": 0, "realign_every": 0}
    # the exported model is the base with the aggregated adapter, loadable with plain transformers
    exported = dict(AutoModelForCausalLM.from_pretrained(report["export_dir"]).state_dict())
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    status = json.loads(subprocess.run(offsite("cloud", "status", "--state", str(state), "--json"),
                                       check=True, capture_output=True, text=True).stdout)["jobs"][0]
    assert status["status"] == "done" and len(status["updates"]) == 3
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(exported[name], base.state_dict()[name])  # the adapter was trained
    middle = "model.layers.3.mlp.up_proj.weight"
    assert torch.equal(exported[middle], base.state_dict()[middle])  # the middle never changes
    assert not torch.equal(exported["model.norm.weight"], base.state_dict()["model.norm.weight"])  # train_extra: the norm too

    blobs = BlobStore(state / "blobs")
    updates = {u["client_id"].rsplit("-", 1)[0]: load_blob(blobs.open_path(u["blob_sha256"])) for u in status["updates"]}
    honest = {k: (updates["client-1"][k].double() + updates["client-2"][k].double()) / 2 for k in updates["attacker"]}
    fedavg = WeightedMean()
    for u in updates.values():
        fedavg.add(u, 1.0)
    fedavg = fedavg.result()

    def distance(tensors):  # L2 distance to the honest mean, per value
        diff = sum(float((tensors[k].double() - honest[k]).square().sum()) for k in honest)
        return (diff / sum(v.numel() for v in honest.values())) ** 0.5

    spread = distance({k: updates["client-1"][k] for k in honest})  # half the honest proposals' own distance
    robust = distance({k: exported[k] for k in honest})
    print(f"\nper-value distance to the honest mean: median {robust:.4g}, FedAvg {distance(fedavg):.4g}, "
          f"honest spread {spread:.4g}")
    assert robust <= spread + 1e-6           # the median sits between the honest proposals, coordinate by coordinate
    assert distance(fedavg) > 1.6            # FedAvg moved 5/3 per value toward the attacker


def test_a_dp_job_closes_rounds_without_the_missing_client_and_reports_epsilon(tiny_model, client_data, tmp_path):
    """Three clients are expected, two come: each round closes at its deadline with min_clients, and the
    DP-FedAvg accountant charges both rounds."""
    state, report = run_job(tmp_path, tiny_model, client_data, ["client-1", "client-2", "client-3"],
                            "rounds = 2\nclients_per_round = 3\nmin_clients = 2\nround_timeout_s = 2\n"
                            "[privacy]\nclip = 0.5\nnoise = 0.8\n")
    assert [c["id"] for c in report["clients"]] == ["client-1", "client-2"]
    assert [c["rounds_participated"] for c in report["clients"]] == [2, 2]
    dp = report["privacy"]
    assert dp["epsilon"] == pytest.approx(epsilon(DPConfig(clip=0.5, noise=0.8), 2)) and 0 < dp["epsilon"] < 100
    assert [len(r) for r in dp["update_norms_before_clipping"]] == [2, 2]
    status = subprocess.run(offsite("cloud", "status", "--state", str(state), "--json"), capture_output=True, text=True, check=True)
    assert json.loads(status.stdout)["jobs"][0]["privacy"]["epsilon_by_round"] == dp["epsilon_by_round"]


@pytest.mark.parametrize("method, extra", [("lora", ""), ("lora", 'train_extra = ["norm", "head"]\n'), ("prompt", ""),
                                           ("bottleneck", "")])
def test_each_kind_of_adapter_method_trains_through_the_real_client_and_plugs_back_in(method, extra, tiny_model, client_data,
                                                                                      tmp_path):
    """One method of each kind over the wire: merged into the adapter (lora; with the norm in full and LoRA
    on the tied head too), virtual tokens beside it (prompt), modules of our own (bottleneck).
    tests/test_methods.py covers every method in-process."""
    size = {"lora": "r = 2\n", "adalora": "r = 2\ntarget_r = 1\n",  # at width 32, rank 2 is 1/8 of the weights
            "bottleneck": "bottleneck_dim = 4\n"}.get(method, "")
    _, report = run_job(tmp_path, tiny_model, client_data[:1], ["client-1"],
                        f'rounds = 1\nclients_per_round = 1\nlr = 0.03\nepochs = 4.0\n{extra}[adapter]\nmethod = "{method}"\n{size}')
    m, ev = report["adapter_method"], report["eval"]["all"]
    if extra:
        exported = AutoModelForCausalLM.from_pretrained(report["export_dir"]).state_dict()
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model)).state_dict()
        assert all(not torch.equal(exported[n], base[n]) for n in ("model.norm.weight", "model.embed_tokens.weight"))
        assert torch.equal(exported["lm_head.weight"], exported["model.embed_tokens.weight"])  # still one matrix
    dense_bytes = 4 * report["split"]["adapter_params"]
    assert m["name"] == method and 0 < m["trainable_params"] < report["split"]["adapter_params"] / 4
    assert report["clients"][0]["upload_bytes"] < dense_bytes / 3  # only the method's tensors travel
    assert ev["plug_in"] < ev["full_zero_shot"] - 0.01  # it learned, and the merged adapter carries it to the full model
    assert abs(ev["plug_in"] - ev["emulator_with_adapter"]) < 0.5


def test_a_secure_aggregation_job_with_dp_runs_over_real_processes(tiny_model, client_data, tmp_path):
    """Three clients mask their changes; the coordinator only ever holds masked inputs and the sum."""
    names = ["client-1", "client-2", "client-3"]
    data = domain.write_clients(tmp_path / "data", n_clients=3, n_train=30, n_heldout=10)
    state, report = run_job(tmp_path, tiny_model, data, names, "rounds = 2\nclients_per_round = 3\nlr = 0.03\n"
                            "[privacy]\nsecure_aggregation = true\nclip = 5.0\nnoise = 0.01\n")
    ev = report["eval"]["all"]
    assert ev["plug_in"] < ev["full_zero_shot"] - 0.01  # the unmasked, noised sum still trains the adapter
    assert [c["rounds_participated"] for c in report["clients"]] == [2, 2, 2]
    assert report["privacy"]["epsilon"] == pytest.approx(epsilon(DPConfig(clip=5.0, noise=0.01), 2))
    assert report["rejected_updates"] == []
    masked = 8 * (report["split"]["adapter_params"] + 1)  # one uint64 per adapter value, and the weight
    assert all(2 * masked < c["upload_bytes"] < 2 * masked + 4096 for c in report["clients"])
