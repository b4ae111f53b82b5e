"""End to end: the coordinator and clients as real processes over loopback mutual TLS."""
import json
import subprocess
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from offsite.cloud.privacy import DPConfig, epsilon
from offsite.demo import domain
from tests.procs import offsite


def run_job(tmp_path, tiny_model, client_data, names, job_extra=""):
    """Init a coordinator for `names`, run one job with the clients of `client_data`; return (state, report)."""
    state = tmp_path / "state"
    subprocess.run(offsite("cloud", "init", "--state", str(state), "--clients", ",".join(names)), check=True)
    sets = ", ".join(f'"{f.name}" = "{f / "heldout.jsonl"}"' for f in client_data)
    (tmp_path / "job.toml").write_text(f'[job]\nid = "e2e"\nbase_model = "{tiny_model}"\n{job_extra}'
                                       f'[split]\nemulator_layers = 1\n[training]\nbatch_size = 8\n'
                                       f'[eval]\nsets = {{ {sets} }}\n')
    subprocess.run(offsite("cloud", "jobs", "create", "--state", str(state), "--config", str(tmp_path / "job.toml")), check=True)
    server = subprocess.Popen(offsite("cloud", "serve", "--state", str(state), "--address", "127.0.0.1:0",
                                      "--port-file", str(tmp_path / "port"), "--exit-when-done"))
    try:
        deadline = time.time() + 60
        while not (tmp_path / "port").exists():
            assert server.poll() is None and time.time() < deadline, "coordinator did not start"
            time.sleep(0.1)
        ports = json.loads((tmp_path / "port").read_text())
        clients = [subprocess.Popen(offsite("client", "run", "--server", f"localhost:{ports['port']}",
                                            "--enroll-server", f"localhost:{ports['enroll_port']}", "--ca", str(state / "tls" / "ca.pem"),
                                            "--workdir", str(tmp_path / f.name), "--data", str(f / "train.jsonl"),
                                            "--token-file", str(state / "tokens" / f"{f.name}.token"), "--threads", "1",
                                            "--no-progress"), stderr=subprocess.PIPE, text=True)
                   for f in client_data]
        for c in clients:
            _, err = c.communicate(timeout=180)
            assert c.returncode == 0, err
        assert server.wait(timeout=120) == 0
    finally:
        server.kill()
    return state, json.loads((state / "jobs" / "e2e" / "report.json").read_text())


def test_one_round_over_mutual_tls_with_real_processes(tiny_model, client_data, tmp_path):
    state, report = run_job(tmp_path, tiny_model, client_data, ["client-1", "client-2"], "rounds = 1\nclients_per_round = 2\n")
    assert [c["rounds_participated"] for c in report["clients"]] == [1, 1]
    assert all(c["upload_bytes"] > 0 and c["train_examples"] == 40 for c in report["clients"])
    assert report["transport"] == {"tls": True, "sealed_updates": True}
    assert set(report["eval"]) == {"all", "client-1", "client-2"}
    assert report["emulator"] == {"strategy": "uniform", "attn_rank": None, "quantized": None, "distill_steps": 0}
    # the exported model is the base with the aggregated adapter, loadable with plain transformers
    exported = AutoModelForCausalLM.from_pretrained(report["export_dir"])
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    status = json.loads(subprocess.run(offsite("cloud", "status", "--state", str(state), "--json"),
                                       check=True, capture_output=True, text=True).stdout)
    assert status["jobs"][0]["status"] == "done" and len(status["jobs"][0]["updates"]) == 2
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(exported.state_dict()[name], base.state_dict()[name])  # the adapter was trained
    middle = "model.layers.3.mlp.up_proj.weight"
    assert torch.equal(exported.state_dict()[middle], base.state_dict()[middle])  # the middle never changes


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


@pytest.mark.parametrize("method", ["lora", "prompt", "bottleneck"])
def test_each_kind_of_adapter_method_trains_through_the_real_client_and_plugs_back_in(method, tiny_model, client_data, tmp_path):
    """One method of each kind over the wire: merged into the adapter (lora), virtual tokens beside it
    (prompt), modules of our own (bottleneck). tests/test_methods.py covers every method in-process."""
    size = {"lora": "r = 2\n", "adalora": "r = 2\ntarget_r = 1\n",  # at width 32, rank 2 is 1/8 of the weights
            "bottleneck": "bottleneck_dim = 4\n"}.get(method, "")
    _, report = run_job(tmp_path, tiny_model, client_data[:1], ["client-1"],
                        f'rounds = 1\nclients_per_round = 1\nlr = 0.03\nepochs = 4.0\n[adapter]\nmethod = "{method}"\n{size}')
    m, ev = report["adapter_method"], report["eval"]["all"]
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
