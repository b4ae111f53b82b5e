"""The README's walkthrough ("Running it yourself"), run exactly as written: the lines between its markers,
in one bash, from a folder that has the repository's docs/ and .venv/ (what the README's reader has)."""
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- walkthrough:begin -->\n```sh\n(.*?)```\n<!-- walkthrough:end -->", re.S)


def walkthrough() -> str:
    found = BLOCK.findall((ROOT / "README.md").read_text())
    assert len(found) == 1, "README.md has one walkthrough block between its markers"
    return found[0]


def test_the_readme_walkthrough_runs_as_written(tmp_path):
    if not (ROOT / ".venv" / "bin" / "activate").is_file():
        pytest.skip("the walkthrough activates the repository's .venv (make install)")
    for name in ("docs", ".venv"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "OFFSITE_FAILPOINTS")}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", walkthrough()], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=420)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "support-bot: done, round 5/5" in done.stdout, done.stdout
    answer = json.loads(done.stdout[done.stdout.index('{"id"'):].splitlines()[0])  # curl's reply, the last output
    assert answer["model"] == "support-bot" and answer["usage"]["completion_tokens"] > 0
    report = json.loads((tmp_path / "first-job" / "state" / "jobs" / "support-bot" / "report.json").read_text())
    validation = report["eval"]["validation"]
    assert validation["plug_in"] < validation["full_zero_shot"] - 0.5, validation  # the first job learned something
    assert "Traceback" not in done.stderr
