"""deploy/: the Dockerfile, compose.yaml and the Kubernetes manifests, checked without Docker or a cluster:
what they copy exists, every command they run parses with the real CLI, the files they hand around have
the names `offsite cloud init` writes, and the Kubernetes objects hang together."""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from offsite.cli import main as offsite_main
from offsite.cloud import probe as health_probe
from offsite.cloud.identity import StateLayout

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "compose.yaml"
K8S_FILES = sorted((DEPLOY / "k8s").rglob("*.yaml"))


# --- reading the files ------------------------------------------------------------------------------
def dockerfile(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) per logical line: continuations joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    return out


def _args(rest: str) -> list[str]:
    return json.loads(rest) if rest.startswith("[") else shlex.split(rest)


def stages(instructions) -> dict[str, list[str] | None]:
    """Stage name -> its ENTRYPOINT (inherited from the stage it is built FROM)."""
    entry: dict[str, list[str] | None] = {}
    current = None
    for word, rest in instructions:
        if word == "FROM":
            parts = rest.split()
            current = parts[2] if len(parts) == 3 and parts[1].lower() == "as" else None
            entry[current] = entry.get(parts[0])
        elif word == "ENTRYPOINT":
            entry[current] = _args(rest)
    return entry


def copy_sources(instructions) -> list[str]:
    sources = []
    for word, rest in instructions:
        if word in ("COPY", "ADD") and "--from=" not in rest:
            sources += [a for a in _args(rest) if not a.startswith("--")][:-1]
    return sources


def dockerignored(path: str, pattern: str) -> bool:
    """Docker's rule: the pattern (`*` within a folder, `**` across folders) matches the path or a folder above it."""
    regex = re.escape(pattern.strip("/")).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
    parts = path.split("/")
    return any(re.fullmatch(regex.replace(r"\?", "[^/]"), "/".join(parts[:i])) for i in range(1, len(parts) + 1))


def kept_out(path: str, patterns: list[str]) -> str | None:
    """The .dockerignore pattern that keeps `path` out of the build context, or None: the last pattern that
    matches decides, and one starting with `!` lets the path back in."""
    verdict = None
    for pattern in patterns:
        if dockerignored(path, pattern.removeprefix("!")):
            verdict = None if pattern.startswith("!") else pattern
    return verdict


def interpolate(text: str) -> str:
    """What compose makes of a file with an empty environment: ${VAR:-default} -> default, $$ -> $."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text).replace("$$", "$")


def k8s_objects() -> list[tuple[Path, dict]]:
    return [(p, doc) for p in K8S_FILES for doc in yaml.safe_load_all(p.read_text()) if doc is not None]


def pod_spec(obj: dict) -> dict | None:
    spec = obj.get("spec", {})
    return spec.get("template", {}).get("spec") if obj["kind"] in ("StatefulSet", "Deployment", "Job") else None


# --- commands ---------------------------------------------------------------------------------------
SEPARATORS = {";", "&&", "||", "|"}
REDIRECTS = {">", ">>", "<", ">&"}
KEYWORDS = {"if", "then", "else", "elif", "fi", "do", "done", "while", "!", "exec"}


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a small POSIX shell script (what compose and the manifests run with sh -c)."""
    commands = []
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        argv, skip = [], False
        for token in [*lexer, ";"]:
            if skip:
                skip = False
            elif token in REDIRECTS:
                skip = True
            elif token in SEPARATORS:
                while argv and argv[0] in KEYWORDS:
                    argv.pop(0)
                if argv:
                    commands.append(argv)
                argv = []
            else:
                argv.append(token)
    return commands


def expand(command: list[str]) -> list[list[str]]:
    """The argvs a container command runs: itself, or what its `sh -c` script runs."""
    if len(command) >= 3 and Path(command[0]).name in ("sh", "bash") and command[1].startswith("-") and "c" in command[1]:
        syntax = subprocess.run(["sh", "-n", "-c", command[2]], capture_output=True, text=True, timeout=10)
        assert syntax.returncode == 0, f"shell syntax error: {syntax.stderr}\n{command[2]}"
        return shell_commands(command[2])
    return [command]


class _Parsed(Exception):
    def __init__(self, namespace):
        self.namespace = namespace


def parse(argv: list[str]) -> argparse.Namespace | None:
    """Run the real CLI on argv up to its parse: the top-level parser's namespace, or a test failure where
    argparse refuses it. None for a command that is not offsite's."""
    module = argv[2] if argv[:2] == ["python", "-m"] and len(argv) > 2 else None
    if argv[0] == "offsite":
        run = lambda: offsite_main(argv[1:])  # noqa: E731
    elif module == "offsite.cloud.probe":
        run = lambda: health_probe.main(argv[3:])  # noqa: E731
    elif module == "offsite.demo":
        from offsite.demo.__main__ import main as demo_main
        run = demo_main
    else:
        return None
    real = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        raise _Parsed(real(self, args, namespace))

    mp = pytest.MonkeyPatch()
    mp.setattr(argparse.ArgumentParser, "parse_args", capture)
    mp.setattr(sys, "argv", ["python -m offsite.demo", *argv[3:]])  # the demo parses sys.argv
    try:
        run()
    except _Parsed as parsed:
        return parsed.namespace
    except SystemExit as e:
        pytest.fail(f"the CLI refuses `{shlex.join(argv)}` (exit {e.code}; argparse's reason is in stderr)")
    finally:
        mp.undo()
    pytest.fail(f"`{shlex.join(argv)}` ran without parsing its arguments")


def name_of(argv: list[str], ns: argparse.Namespace) -> str:
    """'offsite cloud jobs create', 'python -m offsite.demo': what ran, global options aside."""
    if argv[0] != "offsite":
        return " ".join(argv[:3])
    words = [ns.group, ns.command, getattr(ns, f"{ns.command}_command", None)]
    return " ".join(["offsite", *filter(None, words)])


def parse_all(argvs: list[list[str]]) -> list[tuple[str, argparse.Namespace]]:
    return [(name_of(argv, ns), ns) for argv in argvs if (ns := parse(argv)) is not None]


def every(parsed, name: str) -> list[argparse.Namespace]:
    return [ns for n, ns in parsed if n == name]


def one(parsed, name: str) -> argparse.Namespace:
    found = every(parsed, name)
    assert len(found) == 1, f"expected one `{name}`, found {len(found)}"
    return found[0]


def port(address: str) -> int:
    return int(address.rpartition(":")[2])


def compose_commands(service: dict, image_entry: dict[str, list[str] | None]) -> list[list[str]]:
    entry = service.get("entrypoint", image_entry.get(IMAGES.get(service.get("image"))))
    command = service.get("command", [])
    assert isinstance(entry, list) and isinstance(command, list), "write entrypoint and command as lists"
    argvs = expand(entry + command)
    test = service.get("healthcheck", {}).get("test")
    if test:
        assert test[0] == "CMD", "healthcheck test: the exec form [CMD, ...]"
        argvs.append(test[1:])
    return argvs


def container_commands(container: dict) -> list[list[str]]:
    command = container.get("command", ["offsite"])  # no command: the image's ENTRYPOINT (checked below)
    argvs = expand(command + container.get("args", []))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if "exec" in container.get(probe, {}):
            argvs.append(container[probe]["exec"]["command"])
    return argvs


# --- the image --------------------------------------------------------------------------------------
def test_dockerfile_installs_only_the_wheelhouse_and_the_context_keeps_it():
    """The images build offline: the only thing copied in is the wheelhouse `make images` makes (the project's
    own wheel is in it), pip installs with --no-index, and the wheelhouse stays in a stage of its own."""
    instructions = dockerfile()
    assert copy_sources(instructions) == ["build/wheelhouse"]
    runs = [rest for word, rest in instructions if word == "RUN" and "pip install" in rest]
    assert runs and all("--no-index" in r for r in runs), f"pip must not reach an index: {runs}"
    wheel_stage = [rest.split()[-1] for word, rest in instructions if word == "FROM"][1]
    assert ("COPY", f"--from={wheel_stage} /opt/venv /opt/venv") in instructions
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for file in ("build/wheelhouse/offsite-0.1.0-py3-none-any.whl", "build/wheelhouse/torch-2.13.0+cpu.whl"):
        assert kept_out(file, patterns) is None, f".dockerignore keeps {file} out of the build context"
    for heavy in (".venv", "runs", ".git", "build/lib/offsite/cli.py", "tests/x.key", "state/tokens/a.token"):
        assert kept_out(heavy, patterns), f"{heavy} would be sent to the Docker daemon with every build"
    entry = stages(instructions)
    assert {"coordinator", "client"} <= set(entry)
    assert entry["coordinator"] == entry["client"] == ["offsite"]
    # the uid the image runs as is the one the manifests require
    uids = {int(u) for u in re.findall(r"useradd[^\n]*--uid (\d+)", DOCKERFILE.read_text())}
    users = {rest for word, rest in instructions if word == "USER"}
    assert uids == {10001} and users == {"10001"}


# --- compose ----------------------------------------------------------------------------------------
IMAGES = {"offsite-coordinator:dev": "coordinator", "offsite-client:dev": "client"}  # what `make images` tags


def test_compose_runs_the_images_hardened_and_its_commands_parse():
    compose = yaml.safe_load(interpolate(COMPOSE.read_text()))
    services, volumes = compose["services"], set(compose.get("volumes", {}))
    entry = stages(dockerfile())
    argvs = []
    for name, service in services.items():
        assert IMAGES.get(service.get("image")) in entry and "build" not in service, \
            f"{name}: runs an image `make images` builds ({', '.join(IMAGES)}), not a build of its own"
        assert service.get("read_only") is True and service.get("tmpfs") == ["/tmp"], f"{name}: a read-only root, /tmp in memory"
        for other in service.get("depends_on", {}):
            assert other in services, f"{name} depends on {other}, which compose does not define"
        for mount in service.get("volumes", []):
            assert mount.split(":")[0] in volumes, f"{name}: volume {mount.split(':')[0]} is not declared"
        argvs += compose_commands(service, entry)
    parsed = parse_all(argvs)

    # The files handed around have the names `cloud init` writes (StateLayout), and the ports line up.
    init = one(parsed, "offsite cloud init")
    layout = StateLayout(Path(init.state))
    names = init.clients.split(",")
    prepared = one(parsed, "python -m offsite.demo")
    assert prepared.prepare_only
    assert one(parsed, "offsite cloud jobs create").config == f"{prepared.out}/job.toml"
    serve = one(parsed, "offsite cloud serve")
    assert serve.state == init.state and serve.exit_when_done
    probe = one(parsed, "python -m offsite.cloud.probe")
    assert probe.ca == str(layout.ca_cert)
    assert port(probe.target) == port(serve.enroll_address) and probe.target.rpartition(":")[0] in init.host
    # What setup copies, by the volume it lands in (setup and the clients mount the volumes at other paths).
    def in_volume(service: dict, path: str) -> tuple[str, str]:
        for mount in service.get("volumes", []):
            volume, where = mount.split(":")[:2]
            if path.startswith(where.rstrip("/") + "/"):
                return volume, path[len(where.rstrip("/")) + 1:]
        raise AssertionError(f"{path} is on no volume of the service")
    copies = [argv for argv in compose_commands(services["setup"], entry) if argv[0] == "cp"]
    handed = {in_volume(services["setup"], str(Path(argv[-1]) / Path(src).name)): src for argv in copies for src in argv[1:-1]}
    clients = {n: next(p for _, p in parse_all(compose_commands(s, entry))) for n, s in services.items() if n.startswith("client-")}
    assert sorted(Path(c.token_file).stem for c in clients.values()) == sorted(names), "one client per token"
    for service_name, c in clients.items():
        name = Path(c.token_file).stem
        service = services[service_name]
        token, ca = in_volume(service, c.token_file), in_volume(service, c.ca)
        assert handed.get(token) == str(layout.tokens / f"{name}.token"), f"{c.token_file}: not what init wrote"
        assert handed.get(ca) == str(layout.ca_cert), f"{c.ca} is not the coordinator's CA certificate"
        # the client's handout volume holds the CA and its own token, nothing else; it never sees the state
        assert sorted(f for v, f in handed if v == token[0]) == sorted([Path(layout.ca_cert).name, f"{name}.token"])
        assert all(not m.startswith("state:") for m in service["volumes"]), f"{service_name} mounts the coordinator's state"
        assert c.data == f"{prepared.out}/data/{name}/train.jsonl" and c.heldout == f"{prepared.out}/data/{name}/heldout.jsonl"
        host, _, p = c.server.rpartition(":")
        assert host in services and host in init.host, f"{c.server}: not the coordinator's service and certificate name"
        assert int(p) == port(serve.address) and port(c.enroll_server) == port(serve.enroll_address)


# --- Kubernetes -------------------------------------------------------------------------------------
def test_k8s_objects_hang_together():
    objects = k8s_objects()
    for path, obj in objects:
        for field in ("apiVersion", "kind"):
            assert obj.get(field), f"{path.name}: an object without {field}"
        assert obj.get("metadata", {}).get("name"), f"{path.name}: a {obj['kind']} without metadata.name"
    by_kind = {}
    for _, obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    pods = [(obj, pod_spec(obj)) for _, obj in objects if pod_spec(obj)]
    assert {o["kind"] for o, _ in pods} >= {"StatefulSet", "Job"}
    for obj, spec in pods:
        where = f"{obj['kind']} {obj['metadata']['name']}"
        security = spec.get("securityContext", {})
        assert security.get("runAsNonRoot") is True and security.get("runAsUser") == 10001, where
        volumes = {v["name"] for v in spec.get("volumes", [])}
        volumes |= {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert c.get("name") and c.get("image"), f"{where}: a container without name or image"
            assert c.get("resources", {}).get("requests"), f"{where}/{c['name']}: no resource requests"
            assert c.get("securityContext", {}).get("readOnlyRootFilesystem") is True, f"{where}/{c['name']}"
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes, f"{where}/{c['name']} mounts {m['name']}, which the pod does not have"

    assert len(by_kind["StatefulSet"]) == 1
    sts = by_kind["StatefulSet"][0]
    spec = pod_spec(sts)
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    coordinator = spec["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert "exec" in coordinator.get(probe, {}), f"the coordinator has no exec {probe}"
    container_ports = {p["name"]: p["containerPort"] for p in coordinator["ports"]}
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == container_ports["http"]

    # Services reach the coordinator's ports; the StatefulSet names an existing one.
    services = by_kind["Service"]
    assert sts["spec"]["serviceName"] in {s["metadata"]["name"] for s in services}
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items(), f"{service['metadata']['name']} selects no pod"
        for p in service["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            number = container_ports.get(target, target)
            assert number in container_ports.values() and number == p["port"], \
                f"Service {service['metadata']['name']} port {p['port']} -> {target}: no such containerPort"

    # The commands parse, and use the ports and paths the pod really has.
    parsed = parse_all([argv for c in spec.get("initContainers", []) + spec["containers"] for argv in container_commands(c)])
    serve = one(parsed, "offsite cloud serve")
    assert not serve.exit_when_done, "a StatefulSet restarts a container that exits"
    assert {port(serve.address), port(serve.enroll_address), port(serve.http_address)} == set(container_ports.values())
    layout = StateLayout(Path(serve.state))
    probes = every(parsed, "python -m offsite.cloud.probe")
    assert probes and all(p.ca == str(layout.ca_cert) and port(p.target) == port(serve.enroll_address) for p in probes)
    seed = [argv for c in spec["initContainers"] for argv in expand(c["command"]) if argv[0] in ("cp", "install")]
    assert seed and seed[-1][-1] == str(layout.db), "the seed step must write the state database where serve opens it"
    job = by_kind["Job"][0]
    one(parse_all([argv for c in pod_spec(job)["containers"] for argv in container_commands(c)]), "offsite client run")

    # The Secret: its keys are exactly what the pod mounts, each where StateLayout says serve reads it.
    secret, = [o for o in by_kind["Secret"] if o["metadata"]["name"] == "offsite-coordinator"]
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    mounted, paths = set(), {}
    mounts = {m["name"]: m["mountPath"] for c in spec.get("initContainers", []) + spec["containers"] for m in c["volumeMounts"]}
    for v in spec["volumes"]:
        if v.get("secret", {}).get("secretName") == secret["metadata"]["name"]:
            for item in v["secret"]["items"]:
                mounted.add(item["key"])
                paths[item["key"]] = str(Path(mounts[v["name"]]) / item["path"])
    assert mounted == keys, f"the Secret has {sorted(keys)}, the pod mounts {sorted(mounted)}"
    for need in (layout.ca_cert, layout.ca_key, layout.server_cert, layout.server_key, layout.sealing_key):
        assert paths.get(need.name) == str(need), f"serve reads {need}; the pod puts {need.name} at {paths.get(need.name)}"
    # and `kubectl create secret` as the docs and manifests tell it makes those keys
    for doc in [DEPLOY / "k8s" / "coordinator.yaml", *(DEPLOY / "k8s" / "examples").glob("*.yaml"), ROOT / "docs" / "deploy.md"]:
        for command in re.findall(r"create secret generic offsite-coordinator((?:[^\n]*\\\n)*[^\n]*)", doc.read_text()):
            made = {Path(f).name for f in re.findall(r"--from-file=(\S+)", command)}
            assert made == keys, f"{doc.name}: `kubectl create secret` makes {sorted(made)}, the pod needs {sorted(keys)}"


def test_k8s_manifests_match_the_api_schemas():
    """Strict schema validation, offline, where kubernetes-validate is installed (pip install kubernetes-validate)."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    for path, obj in k8s_objects():
        try:
            kv.validate(obj, kv.latest_version(), strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{path.relative_to(ROOT)} {obj['kind']} {obj['metadata']['name']}: {str(e).splitlines()[0]}")


def test_kubectl_reads_the_manifests():
    """kubectl decodes every object, offline. (`kubectl apply --dry-run=client` would need an API server for
    its type discovery even with --validate=false; `label --local` needs none and still decodes each object
    into its Go type, so a wrongly typed field such as `name: on`, a YAML boolean, fails here.)"""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH")
    files = [arg for p in K8S_FILES for arg in ("-f", str(p))]
    read = subprocess.run(["kubectl", "label", "--local", *files, "checked=true", "-o", "name"],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "KUBECONFIG": "/dev/null"})
    assert read.returncode == 0, read.stderr
    names = {line.split("/", 1)[1] for line in read.stdout.split()}
    assert names == {obj["metadata"]["name"] for _, obj in k8s_objects()}
