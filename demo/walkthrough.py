"""The README's walkthrough ("Running it yourself"), run exactly as written: the lines between its markers, in
one bash, from a folder that holds the repository's docs/ and .venv/ (what the README's reader has). `make demo`
runs it after the demo's own job (tests/test_walkthrough.py checks, in seconds, that every command in it
parses), so the README cannot go stale."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- walkthrough:begin -->\n```sh\n(.*?)```\n<!-- walkthrough:end -->", re.S)
JOB = "support-bot"          # docs/job.example.toml's id, which the walkthrough's commands name
TIMEOUT_S = 600.0


def walkthrough(readme: Path = ROOT / "README.md") -> str:
    """The walkthrough's lines, as the README has them."""
    found = BLOCK.findall(readme.read_text())
    if len(found) != 1:
        raise ValueError(f"{readme} must hold one ```sh block between <!-- walkthrough:begin --> and <!-- walkthrough:end -->")
    return found[0]


def run_walkthrough(folder: Path, root: Path = ROOT) -> dict:
    """Run the walkthrough in `folder` (made anew) and say what came of it: seconds, the job's status line, the
    plug-in's and the base's validation loss, and the served completion; "problems" lists what went wrong."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name in ("docs", ".venv"):
        (folder / name).symlink_to(root / name)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "OFFSITE_FAILPOINTS")}
    started = time.perf_counter()
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", walkthrough(root / "README.md")], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    (folder / "walkthrough.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    out = {"seconds": round(time.perf_counter() - started, 1), "log": str(folder / "walkthrough.log"), "problems": []}
    if done.returncode != 0:
        out["problems"].append(f"the README walkthrough exited {done.returncode}; see {out['log']}")
        return out
    status = next((line for line in reversed(done.stdout.splitlines()) if line.startswith(f"job {JOB}:")), "")  # cloud status
    out["status"] = status
    if not status.startswith(f"job {JOB}: done, round 5/5"):
        out["problems"].append(f"the walkthrough's job did not finish its 5 rounds: {status!r}")
    report = json.loads((folder / "first-job" / "state" / "jobs" / JOB / "report.json").read_text())
    validation = report["eval"]["validation"]
    out["validation"] = {k: validation[k] for k in ("full_zero_shot", "plug_in")}
    if not validation["plug_in"] < validation["full_zero_shot"] - 0.5:
        out["problems"].append(f"the walkthrough's first job learned too little: {out['validation']}")
    reply = done.stdout[done.stdout.find('{"id"'):].splitlines()[0] if '{"id"' in done.stdout else ""
    answer = json.loads(reply) if reply else {}
    out["completion_tokens"] = answer.get("usage", {}).get("completion_tokens", 0)
    if answer.get("model") != JOB or not out["completion_tokens"]:
        out["problems"].append(f"curl got no completion from the served job: {reply[:200]!r}")
    if "Traceback" in done.stderr:
        out["problems"].append(f"a traceback on stderr; see {out['log']}")
    return out
