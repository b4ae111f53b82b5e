"""The demo report's table and the checks every run must pass."""
from __future__ import annotations

COLUMNS = ["full_zero_shot", "emulator_zero_shot", "emulator_with_adapter", "plug_in", "central_full_finetune"]


def format_table(report: dict) -> str:
    lines = [f"{'held-out loss':<14}" + "".join(f"{c:>23}" for c in COLUMNS)]
    for name, row in report["eval"].items():
        lines.append(f"{name:<14}" + "".join(f"{row.get(c, float('nan')):>23.3f}" for c in COLUMNS))
    if report.get("task_accuracy"):  # the match results its score determines, by greedy decoding
        lines.append(f"{'exact match':<14}" + "".join(f"{c:>23}" for c in COLUMNS))
        for name, row in report["task_accuracy"].items():
            lines.append(f"{name:<14}" + "".join(f"{row.get(c, float('nan')):>23.1%}" for c in COLUMNS))
    p, m, sp = report["protection"], report["model"], report["split"]
    lines += [
        f"gap_closure {report['gap_closure']:.3f}  (plug-in closes this share of the zero-shot -> central gap)",
        f"protection on general text: full {p['full']:.3f}, emulator alone {p['emulator']:.3f}",
        f"model {m['architecture']} {m['num_blocks']} blocks, {m['params']:,} params; adapter {sp['adapter_params']:,}, "
        f"emulator {sp['emulator_params']:,} (middle blocks kept: {sp['emulator_blocks']}; {_made(report['emulator'])})",
        "clients: " + ", ".join(f"{c['id']} {c['train_examples']} ex, {c['rounds_participated']} rounds, "
                                f"{c['upload_bytes']:,} B up" for c in report["clients"]),
    ]
    for row in report.get("dp_sweep") or []:
        lines.append(f"DP-FedAvg noise {row['noise']:g} (clip {row['clip']:g}): plug-in {row['plug_in']:.3f}, "
                     f"epsilon {row['epsilon']:.3g} at delta {row['delta']:g}")
    return "\n".join(lines)


def _made(e: dict) -> str:
    parts = [f"{e['strategy']} drop" + (", kept blocks shared over the dropped ones' depth" if e.get("shared") else "")]
    if e["distill_steps"]:
        parts.append(f"distilled {e['distill_steps']} steps")
    if e["attn_rank"]:
        parts.append(f"attention rank {e['attn_rank']}")
    if e["quantized"]:
        parts.append(e["quantized"])
    return ", ".join(parts)


def checks(report: dict, min_gap_closure: float = 0.5) -> list[str]:
    """What must hold in every demo run; returns the failures. `make demo` asks gap_closure >= 0.5; a smaller
    job (tests/test_containers.py) learns less and asks less of it."""
    problems = []
    for name, row in report["eval"].items():
        if not row["plug_in"] < row["full_zero_shot"]:
            problems.append(f"{name}: plug_in {row['plug_in']} is not below full_zero_shot {row['full_zero_shot']}")
    if not report["protection"]["emulator"] > report["protection"]["full"]:
        problems.append(f"protection: emulator {report['protection']['emulator']} is not worse than full {report['protection']['full']}")
    if report["gap_closure"] < min_gap_closure:
        problems.append(f"gap_closure {report['gap_closure']} < {min_gap_closure}")
    if abs(report["export_reload_plug_in"] - report["eval"]["all"]["plug_in"]) > 1e-3:
        problems.append(f"exported model reloads with loss {report['export_reload_plug_in']}, not the plug-in's")
    if "served" in report and not report["served"]["matches_export"]:
        problems.append(f"the served job answered {report['served']['answer']!r}, not what generate gives on its export")
    return problems
