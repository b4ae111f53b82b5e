"""The health probe (`offsite cloud probe`, `python -m offsite.cloud.probe`) against a real in-process coordinator."""
import socket
import subprocess
import sys

import pytest

from offsite.cli import main as offsite_main
from offsite.cloud import probe as health_probe
from offsite.cloud.coordinator import Coordinator
from offsite.cloud.identity import StateLayout, init_state
from offsite.cloud.server import SERVICE_NAME, start_server


@pytest.fixture
def served(tmp_path):
    """A coordinator with no job: the health service does not need one."""
    layout = StateLayout(tmp_path / "state")
    init_state(layout.root, ["client-1"], ["localhost", "127.0.0.1"], 3600)
    coordinator = Coordinator.open(layout.root)
    running = start_server(coordinator, layout, "127.0.0.1:0", "127.0.0.1:0")
    yield layout, running
    running.stop(None)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_probe_is_true_only_while_the_coordinator_serves(served, tmp_path):
    layout, running = served
    enroll = f"127.0.0.1:{running.enroll_port}"
    assert health_probe.SERVICE == SERVICE_NAME
    assert health_probe.probe(enroll, layout.ca_cert)
    assert health_probe.probe(f"localhost:{running.enroll_port}", layout.ca_cert, service="")  # the whole server
    assert not health_probe.probe(enroll, layout.ca_cert, service="no.such.Service")  # NOT_FOUND
    assert not health_probe.probe(f"127.0.0.1:{_closed_port()}", layout.ca_cert, timeout=2)
    # the mutual-TLS port wants a client certificate the probe does not have
    assert not health_probe.probe(f"127.0.0.1:{running.port}", layout.ca_cert, timeout=2)
    other = StateLayout(tmp_path / "other")  # a CA that did not sign this server's certificate
    init_state(other.root, ["x"], ["127.0.0.1"], 3600)
    assert not health_probe.probe(enroll, other.ca_cert, timeout=2)
    running.enter_graceful_shutdown()  # what `serve` does on SIGTERM: drain, and say so
    assert not health_probe.probe(enroll, layout.ca_cert)
    assert health_probe.check(enroll, layout.ca_cert) == (False, "NOT_SERVING")


def test_cli_exit_codes_and_one_line_message(served, capsys):
    layout, running = served
    args = ["--target", f"127.0.0.1:{running.enroll_port}", "--ca", str(layout.ca_cert)]
    assert offsite_main(["cloud", "probe", *args]) == 0
    assert capsys.readouterr().out.strip() == f"127.0.0.1:{running.enroll_port} {SERVICE_NAME}: SERVING"
    assert health_probe.main([*args, "--timeout", "2"]) == 0
    assert offsite_main(["cloud", "probe", "--target", f"127.0.0.1:{_closed_port()}", "--ca", str(layout.ca_cert),
                         "--timeout", "2"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert health_probe.main(["--target", args[1], "--ca", str(layout.root / "missing.pem")]) == 1
    assert "cannot read the CA file" in capsys.readouterr().err
    running.enter_graceful_shutdown()
    assert offsite_main(["cloud", "probe", *args]) == 1
    assert capsys.readouterr().err.strip().endswith("NOT_SERVING")


def test_probe_module_does_not_load_torch():
    """It runs every few seconds in a container: `python -m offsite.cloud.probe` must stay light."""
    out = subprocess.run([sys.executable, "-c", "import sys, offsite.cloud.probe; print(sorted("
                          "m for m in ('torch', 'transformers') if m in sys.modules))"],
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
