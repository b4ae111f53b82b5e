"""Data checked against the job's tokenizer before anyone's time is spent: `offsite client check` offline, and a
client that cannot use its data after enrolling tells the coordinator why before it exits."""
import contextlib
import io
import json

import pytest

from offsite.cli import main
from tests.procs import offsite, run_clients, serve_until_done

CHAT = {"messages": [{"role": "user", "content": "score: 2-1 result?"}, {"role": "assistant", "content": "home win"}]}


def cli(*args) -> str:
    """An `offsite` command in this process (no interpreter start-up); its output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main([str(a) for a in args]) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def bundle(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    cli("emulator", "build", "--model", tiny_model, "--emulator-layers", "1", "--out", out)
    return out


def test_check_reports_counts_lengths_and_truncation(bundle, client_data):
    line = cli("client", "check", "--data", client_data[0] / "train.jsonl", "--bundle", bundle, "--max-length", "16").strip()
    assert line.startswith(f"{client_data[0] / 'train.jsonl'}: 40 examples, ") and "cut at max_length 16" in line
    truncated = int(line.split("; ")[1].split(" ")[0])
    assert 0 < truncated <= 40   # the demo's records are longer than 16 tokens


@pytest.mark.parametrize("data, bundle_arg, code, message", [
    (CHAT, None, 2, "example 1: chat examples need a chat template"),
    ({"text": 3}, None, 2, "d.jsonl:1: expected a non-empty string field 'text'"),
    ({"text": "fine"}, "missing", 5, "missing"),
])
def test_check_names_what_is_wrong(bundle, tmp_path, capsys, data, bundle_arg, code, message):
    (tmp_path / "d.jsonl").write_text(json.dumps(data) + "\n")
    folder = str(tmp_path / bundle_arg) if bundle_arg else str(bundle)
    assert main(["client", "check", "--data", str(tmp_path / "d.jsonl"), "--bundle", folder]) == code
    assert message in capsys.readouterr().err


def test_a_client_that_cannot_render_its_data_tells_the_coordinator_and_exits_2(tiny_model, tmp_path):
    """The base has no chat template and the data owner holds chat data: the client enrolls, fetches the bundle,
    fails to render its first example, reports that, and exits 2; `cloud status` names the client and the
    reason while the job is still running."""
    state = tmp_path / "state"
    (tmp_path / "client-1").mkdir()
    (tmp_path / "client-1" / "train.jsonl").write_text(json.dumps(CHAT) + "\n")
    cli("cloud", "init", "--state", state, "--clients", "client-1")
    (tmp_path / "job.toml").write_text(f'[job]\nid = "j"\nbase_model = "{tiny_model}"\n[split]\nemulator_layers = 1\n')
    cli("cloud", "jobs", "create", "--state", state, "--config", tmp_path / "job.toml")
    server, ports = serve_until_done(state, tmp_path / "port")
    try:
        (client,) = run_clients(state, ports, [tmp_path / "client-1"], tmp_path / "work")
        _, err = client.communicate(timeout=120)
        assert client.returncode == 2, err
        assert "chat examples need a chat template" in err and "Traceback" not in err
        status = json.loads(cli("cloud", "status", "--state", state, "--json"))
    finally:
        server.kill()
    (row,) = status["clients"]
    assert row["name"] == "client-1"
    assert row["activity"].startswith("failed in round 1: DataError: example 1: chat examples need a chat template")
    assert status["jobs"][0]["status"] == "running"


def test_ctrl_c_stops_a_training_client_at_once_and_says_how_to_resume(tiny_model, client_data, tmp_path):
    import signal
    import time
    state = tmp_path / "state"
    cli("cloud", "init", "--state", state, "--clients", "client-1")
    (tmp_path / "job.toml").write_text(f'[job]\nid = "j"\nbase_model = "{tiny_model}"\n[split]\nemulator_layers = 1\n'
                                       f'[training]\nepochs = 200.0\nbatch_size = 2\n')
    cli("cloud", "jobs", "create", "--state", state, "--config", tmp_path / "job.toml")
    server, ports = serve_until_done(state, tmp_path / "port")
    try:
        (client,) = run_clients(state, ports, client_data[:1], tmp_path / "work")
        deadline = time.monotonic() + 120
        while not list((tmp_path / "work" / "client-1").glob("jobs/j/bundle/*.safetensors")):  # training starts next
            assert client.poll() is None and time.monotonic() < deadline, client.stderr.read()
            time.sleep(0.2)
        time.sleep(3.0)
        sent = time.monotonic()
        client.send_signal(signal.SIGINT)
        _, err = client.communicate(timeout=60)
        waited = time.monotonic() - sent
    finally:
        server.kill()
    assert client.returncode == 130, err
    assert "stopped (Ctrl-C). Run the same command to go on" in err and "Traceback" not in err
    assert waited < 5.0, f"{waited:.1f} s to stop"


def test_client_threads_share_the_cores_among_the_clients_running_here(tmp_path):
    from offsite.client.run import default_threads, running_clients
    assert [default_threads(2, n) for n in (1, 2, 3)] == [2, 1, 1] and default_threads(16, 3) == 5
    for pid, args in {"10": ["python", "-m", "offsite.cli", "client", "run", "--data", "a"], "11": ["/v/bin/offsite", "client", "run"],
                      "12": ["/v/bin/offsite", "cloud", "serve"], "13": ["vim", "client", "run"]}.items():
        (tmp_path / pid).mkdir()
        (tmp_path / pid / "cmdline").write_bytes(b"\0".join(a.encode() for a in args) + b"\0")
    assert running_clients(tmp_path) == 2
    assert running_clients(tmp_path / "none") == 1
