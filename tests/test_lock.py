"""`make test` and `make demo` run on exactly the locked releases, and the lock agrees with pyproject.toml."""
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCKS = [ROOT / "requirements" / name for name in ("torch-cpu.lock", "runtime.lock", "dev.lock")]


def locked(path: Path) -> dict[str, Version]:
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==(\S+)", path.read_text(), re.M)
    return {canonicalize_name(name): Version(version) for name, version in pins}


def test_every_pin_has_hashes_and_the_locks_agree():
    seen: dict[str, Version] = {}
    for path in LOCKS:
        text = path.read_text()
        blocks = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])  # a block per pin, after the header
        assert blocks and all("--hash=sha256:" in b for b in blocks), f"{path.name}: a pin without a hash"
        for name, version in locked(path).items():
            assert seen.setdefault(name, version) == version, f"{name} is locked at two versions"


def test_the_lock_satisfies_pyproject():
    """pyproject.toml's ranges (for people who install offsite as a library) admit every locked version: an
    edit to a range without `make lock` fails here."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {**locked(LOCKS[0]), **locked(LOCKS[2])}
    for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(line)
        version = pins.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} is not in the lock: run `make lock`"
        assert req.specifier.contains(Version(version.public), prereleases=True), \
            f"{req.name} is locked at {version}, outside pyproject's {req.specifier}: run `make lock`"


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="runs in the project's .venv, which the Makefile installs from the lock "
                           "(make test-latest uses .venv-latest, newer releases on purpose)")
def test_the_environment_is_exactly_the_lock():
    pins = {**locked(LOCKS[0]), **locked(LOCKS[2])}
    wrong = []
    for name, version in sorted(pins.items()):
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            wrong.append(f"{name} missing")
            continue
        # torch's local label says which build: +cpu from the lock, a CUDA one where TORCH_INDEX named it
        if (installed.public, installed.local if name != "torch" else None) != (version.public, version.local if name != "torch" else None):
            wrong.append(f"{name} {installed} (locked {version})")
    assert not wrong, "not the locked releases: " + ", ".join(wrong)
