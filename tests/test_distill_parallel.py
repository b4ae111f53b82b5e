"""`accelerate launch` on two CPU processes builds and evaluates as one process does.

Each process distills on half of every batch and DDP averages the gradients; packed windows have equal
token counts, so the steps, and the weights, are those of one process (up to float rounding).
accelerate's `--cpu` starts a single process unless MPI is there, so the two processes are started the
GPU way (torchrun) and ACCELERATE_USE_CPU=1 puts them on CPU with gloo.
"""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from torch.testing import assert_close

from offsite import lm
from offsite.emulator.build import build
from offsite.emulator.config import EmulatorConfig
from offsite.emulator.distill import _batch_indices, _share
from offsite.emulator.evaluate import compare_full_and_emulator

# bf16 autocast is chosen by timing the CPU, which can come out differently in another process: both
# runs are pinned to fp32 so that they compute the same thing.
FP32_CLI = "import sys; from offsite import lm; from offsite.cli import main; lm.cpu_has_fast_bf16 = lambda: False; sys.exit(main(sys.argv[1:]))"


def _launch_two(tmp_path, *offsite_args: str) -> str:
    """Run `offsite <args>` as two CPU processes under `accelerate launch`; return the main process's stdout."""
    script = tmp_path / "offsite_fp32.py"
    script.write_text(FP32_CLI)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", str(script), *offsite_args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_processes_shares_make_up_each_batch():
    batch = _batch_indices(3, 8, 20, seed=0)
    assert _share(batch, 0, 2) + _share(batch, 1, 2) == batch
    assert [i for k in range(4) for i in _share(batch, k, 4)] == batch


def test_two_processes_build_and_evaluate_like_one(tiny_model, client_data, tmp_path, monkeypatch):
    monkeypatch.setattr(lm, "cpu_has_fast_bf16", lambda: False)
    train, heldout = client_data[0] / "train.jsonl", client_data[0] / "heldout.jsonl"
    cfg = EmulatorConfig(emulator_layers=1, distill_data=str(train), distill_steps=4)
    build(str(tiny_model), cfg, tmp_path / "one", show_progress=False)
    _launch_two(tmp_path, "emulator", "build", "--model", str(tiny_model), "--emulator-layers", "1",
                "--distill-data", str(train), "--distill-steps", "4", "--out", str(tmp_path / "two"))

    one, two = (json.loads((tmp_path / b / "offsite-manifest.json").read_text())["provenance"]["distillation"]
                for b in ("one", "two"))
    assert (one.pop("processes"), two.pop("processes")) == (1, 2)
    assert one.pop("last_nmse") == pytest.approx(two.pop("last_nmse"), abs=1e-5)
    assert one == two
    weights = [load_file(str(tmp_path / b / "model.safetensors")) for b in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    for name, w in weights[0].items():
        assert_close(weights[1][name], w, rtol=0, atol=1e-5, msg=name)

    single = compare_full_and_emulator(str(tiny_model), tmp_path / "one", heldout)
    parallel = json.loads(_launch_two(tmp_path, "emulator", "eval", "--model", str(tiny_model), "--emulator",
                                      str(tmp_path / "one"), "--data", str(heldout), "--json"))
    assert parallel["examples"] == single["examples"]
    for name in ("full", "emulator"):
        assert parallel[name]["loss"] == pytest.approx(single[name]["loss"], abs=1e-4)
        assert parallel[name]["params"] == single[name]["params"]
