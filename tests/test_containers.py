"""The images and the demo in containers, for real, where a Docker engine answers (skipped otherwise).

`make images` builds both images with no registry and no network in the build (deploy/images.sh); then
deploy/compose.yaml runs a small demo job to completion: the coordinator is killed with SIGKILL once in
the middle of a round, `restart: on-failure` brings it back, and the job ends with one update per client
per round; the report in the state volume passes the demo's checks. The images run as uid 10001 on a
read-only root, carry no key material or tokens, and each client container sees only the CA and its token.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ("offsite-coordinator:dev", "offsite-client:dev")
# A small job: its base is pretrained less than make demo's and its adapter sees fewer records, so it closes
# less of the gap to central fine-tuning (0.19 to 0.33 measured) than make demo's bar of 0.5 asks.
ROUNDS, EPOCHS = 2, 2
SMALL_JOB = f"--records 200 --rounds {ROUNDS} --epochs {EPOCHS} --base-steps 80 --distill-steps 0"
MIN_GAP_CLOSURE = 0.1
CLIENTS = ("client-1", "client-2", "client-3")
PEM_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----[\\rn\r\n]+[A-Za-z0-9+/=\\rn\r\n]{40,}-----END")  # a key, not its markers


def _run(*argv: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, **kwargs)


def _engine() -> str | None:
    """Why the tests cannot run here, or None."""
    if shutil.which("docker") is None:
        return "no docker command"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return f"no Docker engine answers (`docker info`: {info.stderr.strip()[:200]})"
    if _compose() is None:
        return "neither `docker compose` nor `docker-compose` is installed"
    return None


def _compose() -> list[str] | None:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


WHY_NOT = _engine()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


@pytest.fixture(scope="module")
def images() -> str:
    """`make images`'s own script, with this interpreter making the wheelhouse; returns what it printed."""
    done = subprocess.run([str(ROOT / "deploy" / "images.sh")], cwd=ROOT, env={**os.environ, "PY": sys.executable},
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout)
    return done.stdout


def _layer_files(image: str):
    """(path, bytes) of every regular file in every layer of the image (a `docker save` archive); the bytes
    of files above 256 KiB (libraries, wheels) are not read, b"" stands for them."""
    saved = subprocess.run(["docker", "save", image], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(saved)) as outer:
        for member in outer.getmembers():
            if not member.name.endswith("layer.tar") and not member.name.startswith("blobs/"):
                continue
            data = outer.extractfile(member).read() if member.isfile() else b""
            try:
                inner = tarfile.open(fileobj=io.BytesIO(data))
            except tarfile.ReadError:
                continue
            with inner:
                for f in inner.getmembers():
                    if f.isfile():
                        yield f.name, inner.extractfile(f).read() if f.size < 256 << 10 else b""


def test_the_images_run_unprivileged_and_carry_no_secrets(images):
    assert "images: base " in images
    for image in IMAGES:
        assert _run("docker", "image", "inspect", "-f", "{{.Config.User}}", image).stdout.strip() == "10001"
        history = _run("docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
        assert "token" not in history.lower() and "PRIVATE KEY" not in history
        files = dict(_layer_files(image))
        found = [name for name, data in files.items() if name.endswith((".token", ".key")) or PEM_KEY.search(data)]
        assert found == [], f"{image} carries key material or tokens: {found[:10]}"
        wheels = {p.name for p in (ROOT / "build" / "wheelhouse").glob("*.whl")}
        assert wheels and not {Path(n).name for n in files} & wheels, f"{image}: the wheelhouse became a layer"
        assert any(n.endswith("site-packages/offsite/cli.py") for n in files)  # the scan did see the installed files


def test_the_secret_scan_finds_a_key_planted_in_an_image(images, tmp_path):
    """The scan above is only worth its empty answer if it finds a key that is there."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    key = ec.generate_private_key(ec.SECP256R1()).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                                serialization.NoEncryption())
    (tmp_path / "notes.txt").write_bytes(b'config = """' + key + b'"""\n')  # a key pasted into some file
    base = images.split("images: base ", 1)[1].split()[0]  # the small image the two are built on
    (tmp_path / "Dockerfile").write_text(f"FROM {base}\nCOPY notes.txt /opt/notes.txt\n")
    _run("docker", "build", "--quiet", "--network", "none", "-t", "offsite-planted:test", str(tmp_path))
    try:
        assert [name for name, data in _layer_files("offsite-planted:test") if PEM_KEY.search(data)] == ["opt/notes.txt"]
    finally:
        _run("docker", "rmi", "-f", "offsite-planted:test", check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Compose:
    def __init__(self, project: str, env: dict[str, str]):
        self.base = [*_compose(), "-p", project, "-f", str(ROOT / "deploy" / "compose.yaml")]
        self.env = {**os.environ, **env}

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([*self.base, *args], env=self.env, capture_output=True, text=True, check=check, timeout=600)

    def container(self, service: str) -> str:
        return self("ps", "-q", service).stdout.strip()


def _state(container: str) -> dict:
    return json.loads(_run("docker", "inspect", "-f", "{{json .State}}", container).stdout) | {
        "RestartCount": int(_run("docker", "inspect", "-f", "{{.RestartCount}}", container).stdout)}


def _wait(what: str, probe, timeout_s: float):
    deadline = time.time() + timeout_s
    while not (value := probe()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(2)
    return value


def test_the_demo_runs_in_containers_and_the_coordinator_survives_a_kill(images, tmp_path):
    from offsite.demo.report import checks
    from offsite.demo.run import central_finetune, reload_check

    network = f"offsite-probe-{os.getpid()}"  # an engine that answers may still be unable to run containers on a network
    made = subprocess.run(["docker", "network", "create", network], capture_output=True, text=True)
    ran = made.returncode == 0 and subprocess.run(["docker", "run", "--rm", "--network", network, IMAGES[1], "--help"],
                                                  capture_output=True, text=True, timeout=300)
    subprocess.run(["docker", "network", "rm", network], capture_output=True)
    if not ran or ran.returncode != 0:
        why = made.stderr if made.returncode else ran.stderr
        pytest.skip(f"this Docker engine cannot run containers on a network: {why[-300:]}")
    compose = Compose(f"offsite-test-{os.getpid()}", {"DEMO_ARGS": SMALL_JOB, "COORDINATOR_PORT": str(_free_port()),
                                                      "ENROLL_PORT": str(_free_port()), "STATUS_PORT": str(_free_port())})
    try:
        compose("up", "-d")
        coordinator = _wait("the coordinator", lambda: compose.container("coordinator"), 120)
        # mid-round: once the first update of round 1 is in (the others still training), SIGKILL the process
        # itself from the host (docker kill would count as a stop by hand, which no restart policy undoes)
        _wait("a first update", lambda: "round 1 update from" in compose("logs", "coordinator").stdout, 1200)
        os.kill(_state(coordinator)["Pid"], signal.SIGKILL)
        _wait("the restart", lambda: _state(coordinator)["RestartCount"] >= 1 and _state(coordinator)["Running"], 120)
        final = _wait("the job's end", lambda: (s := _state(coordinator))["Status"] == "exited" and s, 1200)
        logs = compose("logs").stdout
        assert final["ExitCode"] == 0 and final["RestartCount"] == 1, logs[-3000:]
        for name in CLIENTS:
            client = compose.container(name)
            assert _wait(f"{name}'s end", lambda: (s := _state(client))["Status"] == "exited" and s, 300)["ExitCode"] == 0
            mounts = json.loads(_run("docker", "inspect", "-f", "{{json .Mounts}}", client).stdout)
            handout = next(m["Name"] for m in mounts if m["Destination"] == "/handout")
            seen = _run("docker", "run", "--rm", "-v", f"{handout}:/h:ro", "--entrypoint", "ls", IMAGES[1], "/h").stdout.split()
            assert seen == ["ca.pem", f"{name}.token"], f"{name} sees {seen}"
            assert not any(m["Destination"] == "/state" for m in mounts)
            assert json.loads(_run("docker", "inspect", "-f", "{{json .HostConfig.ReadonlyRootfs}}", client).stdout) is True

        for what in ("/state/jobs/demo/report.json", "/demo/export", "/demo/data", "/demo/base"):
            _run("docker", "cp", f"{coordinator}:{what}", str(tmp_path))
        report = json.loads((tmp_path / "report.json").read_text())
        assert [(c["id"], c["rounds_participated"]) for c in report["clients"]] == [(n, ROUNDS) for n in CLIENTS]
        assert report["rejected_updates"] == []
        # the demo's checks: its baseline computed here, as `make demo` does, on the data the clients held
        folders = [tmp_path / "data" / name for name in CLIENTS]
        central = central_finetune(str(tmp_path / "base"), [f / "train.jsonl" for f in folders],
                                   {f.name: f / "heldout.jsonl" for f in folders}, epochs=EPOCHS * ROUNDS, lr=1e-3, batch_size=16,
                                   max_length=256, seed=0).loss
        for name, loss in central.items():
            report["eval"][name]["central_full_finetune"] = loss
        a = report["eval"]["all"]
        report["gap_closure"] = (a["full_zero_shot"] - a["plug_in"]) / (a["full_zero_shot"] - a["central_full_finetune"])
        report["export_reload_plug_in"] = reload_check(tmp_path / "export", folders, 256)
        print(f"containers: eval {report['eval']['all']}, protection {report['protection']}, "
              f"gap_closure {report['gap_closure']:.3f}")
        assert checks(report, MIN_GAP_CLOSURE) == []
    finally:
        compose("down", "-v", check=False)
