"""The end of a job: plug the aggregated adapter into the full model, evaluate, export, report."""
from __future__ import annotations

import json
import time
from pathlib import Path

from offsite import lm
from offsite.cloud.blobs import BlobStore
from offsite.cloud.job import JobConfig
from offsite.cloud.state import State
from offsite.emulator.adapter import load_adapter
from offsite.emulator.bundle import load_bundle
from offsite.emulator.evaluate import losses
from offsite.emulator.plan import SplitPlan
from offsite.emulator.plugin import export, plug_in
from offsite.files import write_json
from offsite.tensors import from_bytes
from offsite.textdata import read_texts


def finalize(cfg: JobConfig, artifacts: dict, state: State, blobs: BlobStore, job_dir: Path, log=print) -> dict:
    """Write `job_dir/report.json` and the exported model; return the report."""
    started = time.perf_counter()
    plan = SplitPlan.from_dict(artifacts["plan"])
    skeleton = from_bytes(blobs.get(artifacts["adapters"][0]))
    adapter = from_bytes(blobs.get(artifacts["adapters"][-1]))
    full, tokenizer = plug_in(cfg.base_model, plan, skeleton)      # the untouched base
    plugged, _ = plug_in(cfg.base_model, plan, adapter)
    emulator, _, _ = load_bundle(artifacts["bundle_dir"])
    tuned_emulator, _, _ = load_bundle(artifacts["bundle_dir"])
    load_adapter(tuned_emulator, plan, adapter, on_emulator=True)
    models = {"full_zero_shot": full, "emulator_zero_shot": emulator,
              "emulator_with_adapter": tuned_emulator, "plug_in": plugged}
    pad = tokenizer.pad_token_id
    sets = {name: lm.encode(tokenizer, read_texts(path), cfg.max_length) for name, path in cfg.eval_sets.items()}
    evaluation = {}
    if sets:
        evaluation["all"] = losses(models, [x for enc in sets.values() for x in enc], pad)
        evaluation.update({name: losses(models, enc, pad) for name, enc in sets.items()})
    protection = None
    if cfg.protection_data:
        general = lm.encode(tokenizer, read_texts(cfg.protection_data), cfg.max_length)
        protection = {"full": round(lm.mean_token_loss(full, general, pad), 4),
                      "emulator": round(lm.mean_token_loss(emulator, general, pad), 4)}
    export_dir = Path(cfg.export_dir or job_dir / "export")
    export(plugged, tokenizer, export_dir)
    updates = state.updates(cfg.job_id)
    names = {c.client_id: c.name for c in state.clients()}
    clients = []
    for client_id in sorted({u.client_id for u in updates}, key=lambda c: names.get(c, c)):
        mine = [u for u in updates if u.client_id == client_id]
        clients.append({"id": names.get(client_id, client_id), "client_id": client_id,
                        "train_examples": mine[-1].num_examples, "rounds_participated": len(mine),
                        "upload_bytes": sum(u.upload_bytes for u in mine)})
    params = artifacts["params"]
    report = {
        "job_id": cfg.job_id,
        "model": {"architecture": full.config.model_type, "num_blocks": plan.num_blocks, "params": params["full"]},
        "split": {"bottom": plan.bottom, "top": plan.top, "emulator_blocks": list(plan.kept_middle),
                  "adapter_params": params["adapter"], "emulator_params": params["emulator"]},
        "rounds": cfg.rounds,
        "clients": clients,
        "rejected_updates": [{"round": r, "client_id": c, "reason": why} for r, c, why in state.rejections(cfg.job_id)],
        "eval": evaluation,
        "protection": protection,
        "export_dir": str(export_dir),
        "transport": {"tls": True, "sealed_updates": True},
        "finalize_seconds": round(time.perf_counter() - started, 1),
    }
    write_json(job_dir / "report.json", report)
    log(f"job {cfg.job_id}: report written to {job_dir / 'report.json'}; model exported to {export_dir}")
    return report


def load_report(job_dir: Path) -> dict:
    return json.loads((job_dir / "report.json").read_text())
