"""The demo's pass/fail checks: each invariant of the issue is caught when it breaks."""
import copy

import pytest

from offsite.demo.report import checks, format_table

ROW = {"full_zero_shot": 6.4, "emulator_zero_shot": 6.5, "emulator_with_adapter": 1.9, "plug_in": 2.0,
       "central_full_finetune": 0.5}
GOOD = {
    "eval": {"all": dict(ROW), "client-1": dict(ROW)},
    "protection": {"full": 5.6, "emulator": 5.7},
    "gap_closure": 0.75,
    "export_reload_plug_in": 2.0,
    "model": {"architecture": "llama", "num_blocks": 8, "params": 100},
    "split": {"adapter_params": 40, "emulator_params": 70, "emulator_blocks": [2, 5]},
    "emulator": {"strategy": "uniform", "distill_steps": 200, "attn_rank": None, "quantized": None},
    "clients": [{"id": "client-1", "train_examples": 10, "rounds_participated": 3, "upload_bytes": 1000}],
    "task_accuracy": {"all": {"full_zero_shot": 0.0, "emulator_zero_shot": 0.0, "emulator_with_adapter": 0.9, "plug_in": 0.85,
                              "central_full_finetune": 0.95}},
}


def test_good_report_passes_and_prints():
    assert checks(GOOD) == []
    table = format_table(GOOD)
    assert "gap_closure 0.750" in table and "distilled 200 steps" in table
    assert "exact match" in table and "85.0%" in table and "95.0%" in table


@pytest.mark.parametrize("path, value, message", [
    (("eval", "client-1", "plug_in"), 6.5, "client-1: plug_in"),
    (("eval", "all", "plug_in"), 6.4, "all: plug_in"),
    (("protection", "emulator"), 5.6, "protection"),
    (("gap_closure",), 0.49, "gap_closure"),
    (("export_reload_plug_in",), 2.5, "reloads"),
])
def test_each_broken_invariant_is_reported(path, value, message):
    report = copy.deepcopy(GOOD)
    target = report
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert any(message in p for p in checks(report))


def test_dp_sweep_rows_are_printed():
    report = copy.deepcopy(GOOD)
    report["dp_sweep"] = [{"noise": 0.01, "clip": 1.0, "epsilon": 1234.5, "delta": 1e-5, "plug_in": 3.25}]
    assert "DP-FedAvg noise 0.01 (clip 1): plug-in 3.250, epsilon 1.23e+03 at delta 1e-05" in format_table(report)
