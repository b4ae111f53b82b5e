"""`offsite emulator build` and `eval` on a saved tiny model (the real from_pretrained path)."""
import json

from offsite.cli import main


def test_build_then_eval(tiny_model, client_data, tmp_path, capsys):
    assert main(["emulator", "build", "--model", str(tiny_model), "--emulator-layers", "1", "--out", str(tmp_path / "b")]) == 0
    assert "blocks [0, 1, 3, 4, 5] of 6" in capsys.readouterr().out
    assert main(["emulator", "eval", "--model", str(tiny_model), "--emulator", str(tmp_path / "b"),
                 "--data", str(client_data[0] / "heldout.jsonl"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["full"]["params"] > out["emulator"]["params"] > 0
    assert out["emulator"]["loss"] > 0 and out["examples"] == 10
    assert abs(out["full"]["ppl"] - 2.718281828 ** out["full"]["loss"]) / out["full"]["ppl"] < 1e-3


def test_build_of_a_bad_plan_is_a_clear_error(tiny_model, tmp_path, capsys):
    assert main(["emulator", "build", "--model", str(tiny_model), "--emulator-layers", "9", "--out", str(tmp_path / "b")]) == 1
    assert "emulator_layers must be in 1..2" in capsys.readouterr().err
