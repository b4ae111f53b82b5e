"""The end of a job: plug the aggregated adapter into the full model, evaluate, export, report."""
from __future__ import annotations

import gc
import math
import threading
import time
from pathlib import Path

from offsite import lm, precision, render
from offsite.cloud import privacy
from offsite.cloud.blobs import BlobStore
from offsite.cloud.job import Artifacts, JobConfig
from offsite.cloud.state import State
from offsite.emulator import methods
from offsite.emulator.bundle import load_bundle, read_manifest
from offsite.emulator.build import load_base
from offsite.emulator.plugin import export, shard_size
from offsite.emulator.realign import apply_patch
from offsite.files import write_json
from offsite.tensors import load_blob
from offsite.emulator.evaluate import answerable, exact_match
from offsite.textdata import Example, read_examples, read_tasks, read_texts


def _evaluate(model, sets: dict[str, list[list[int]]], pad_id: int) -> dict[str, float]:
    """Mean token loss on every set, and on their union as "all" (token-weighted, from the same sums)."""
    sums = {name: lm.loss_sum_count(model, enc, pad_id) for name, enc in sets.items()}
    out = {"all": sum(t for t, _ in sums.values()) / max(1, sum(n for _, n in sums.values()))} if sets else {}
    out.update({name: t / max(n, 1) for name, (t, n) in sums.items()})
    return {k: round(v, 4) for k, v in out.items()}


def _accuracy(model, tokenizer, tasks: dict[str, list[Example]]) -> dict[str, float]:
    """Exact match of greedy decoding on every task set, and on their union as "all"."""
    right = {name: exact_match(model, tokenizer, examples) * len(examples) for name, examples in tasks.items()}
    out = {"all": sum(right.values()) / max(1, sum(map(len, tasks.values())))} if tasks else {}
    out.update({name: right[name] / max(1, len(tasks[name])) for name in tasks})
    return {k: round(v, 4) for k, v in out.items()}


def finalize(cfg: JobConfig, artifacts: Artifacts, state: State, blobs: BlobStore, job_dir: Path, log=print) -> dict:
    """Write `job_dir/report.json` and the exported model; return the report.

    The emulator and the full model are held in turn, never both: each is evaluated as is, then with the
    adapter in it; the full model with the adapter is then exported, in the job's export dtype (the base's
    unless it says otherwise), sharded like the base.
    """
    started = time.perf_counter()
    plan = artifacts.plan
    adapter = load_blob(blobs.open_path(state.global_adapters(cfg.job_id)[-1]))
    method = cfg.method_config()
    placement = cfg.placement(job_dir)
    emulator, tokenizer, _ = load_bundle(artifacts.bundle_dir, placement.device)  # the base's tokenizer, as the bundle carries it
    if artifacts.emulator_patch:  # re-aligned: the emulator the clients trained the last rounds on
        apply_patch(emulator, plan, load_blob(blobs.open_path(artifacts.emulator_patch)))
    pad = render.pad_id(tokenizer)
    eval_examples = {name: read_examples(path) for name, path in cfg.eval_sets.items()}
    sets = {name: lm.encode_examples(tokenizer, examples, cfg.max_length) for name, examples in eval_examples.items()}
    tasks = {name: read_tasks(path) for name, path in cfg.task_sets.items()}
    for name, examples in eval_examples.items():  # an eval set of short answers is scored by exact match too
        short = answerable(tokenizer, examples)
        if short and name not in tasks:
            tasks[name] = short
    general = lm.encode(tokenizer, read_texts(cfg.protection_data), cfg.max_length) if cfg.protection_data else None
    emulator_zero_shot, accuracy = _evaluate(emulator, sets, pad), {"emulator_zero_shot": _accuracy(emulator, tokenizer, tasks)}
    emulator_general = round(lm.mean_token_loss(emulator, general, pad), 4) if general else None
    adapted = methods.apply(emulator, plan, method, adapter, share=True)
    emulator_with_adapter, accuracy["emulator_with_adapter"] = _evaluate(adapted, sets, pad), _accuracy(adapted, tokenizer, tasks)
    del adapted
    del emulator
    gc.collect()  # a model's modules refer to each other: only the collector frees it, and with it its mapped pages
    manifest = read_manifest(artifacts.bundle_dir)  # the adapter blocks are written into: never offloaded
    written = (*(f"{manifest['block_path']}.{i}" for i in plan.adapter_blocks), *(n.rpartition(".")[0] for n in plan.extras))
    full, tokenizer = load_base(cfg.base_model, placement, written, cfg.chat_template or None)
    columns = {"full_zero_shot": _evaluate(full, sets, pad), "emulator_zero_shot": emulator_zero_shot}
    accuracy = {"full_zero_shot": _accuracy(full, tokenizer, tasks), **accuracy}
    protection = {"full": round(lm.mean_token_loss(full, general, pad), 4), "emulator": emulator_general} if general else None
    columns["emulator_with_adapter"] = emulator_with_adapter
    plugged = methods.apply(full, plan, method, adapter, on_emulator=False, share=True)  # both only read it
    columns["plug_in"] = _evaluate(plugged, sets, pad)
    accuracy["plug_in"] = _accuracy(plugged, tokenizer, tasks)
    evaluation = {name: {col: values[name] for col, values in columns.items()} for name in columns["plug_in"]}
    task_accuracy = {name: {col: values[name] for col, values in accuracy.items()} for name in accuracy["plug_in"]}
    export_dir = Path(cfg.export_dir or job_dir / "export")
    export(plugged, tokenizer, export_dir, cfg.resolved_dtype("export_dtype", precision.stored_dtype(full)),
           shard_size(cfg.base_model))
    updates = state.updates(cfg.job_id)
    names = {c.client_id: c.name for c in state.clients()}
    clients = []
    for client_id in sorted({u.client_id for u in updates}, key=lambda c: names.get(c, c)):
        mine = [u for u in updates if u.client_id == client_id]
        clients.append({"id": names.get(client_id, client_id), "client_id": client_id,
                        "train_examples": mine[-1].num_examples, "rounds_participated": len(mine),
                        "upload_bytes": sum(u.upload_bytes for u in mine)})
    params = artifacts.params
    made = manifest["provenance"]
    report = {
        "job_id": cfg.job_id,
        "model": {"architecture": full.config.model_type, "num_blocks": plan.num_blocks, "params": params["full"]},
        "split": {"bottom": plan.bottom, "top": plan.top, "emulator_blocks": list(plan.kept_middle),
                  "adapter_params": params["adapter"], "emulator_params": params["emulator"]},
        "emulator": {"strategy": made["strategy"], "shared": made.get("shared", False), "attn_rank": made.get("attn_rank"), "quantized": made["quantized"],
                     "distill_steps": (made.get("distillation") or {}).get("steps", 0), "realign_every": cfg.realign_every},
        "adapter_method": {**method.to_dict(),
                           "trainable_params": sum(math.prod(shape) for shape, _ in artifacts.update_spec.values())},
        "rounds": cfg.rounds,
        "clients": clients,
        "rejected_updates": [{"round": r, "client_id": c, "reason": why} for r, c, why in state.rejections(cfg.job_id)],
        "eval": evaluation,
        "task_accuracy": task_accuracy or None,  # exact match of greedy decoding on the job's task sets
        "protection": protection,
        "privacy": ({**privacy.summary(cfg.dp_config(), cfg.rounds), "update_norms_before_clipping": artifacts.dp_norms}
                    if cfg.dp_config().enabled else None),
        "export_dir": str(export_dir),
        "transport": {"tls": True, "sealed_updates": True},
        "finalize_seconds": round(time.perf_counter() - started, 1),
    }
    write_json(job_dir / "report.json", report)
    log(f"job {cfg.job_id}: report written to {job_dir / 'report.json'}; model exported to {export_dir}")
    return report


def finalize_job(coordinator, job_id: str, log) -> None:
    """Finalize and record the outcome; a failure marks the job failed instead of killing the server."""
    job = coordinator.job(job_id)
    try:
        report = finalize(job.config, job.artifacts, coordinator.state, coordinator.blobs, coordinator.layout.jobs / job_id,
                          log=log.info)
        coordinator.state.set_job_status(job_id, "done")
    except Exception:
        log.exception("job %s: finalization failed", job_id)
        coordinator.state.set_job_status(job_id, "failed")
    else:
        coordinator.tracking.finished(job.config, report)


class Finalizer:
    """`serve`'s finalizations: each on a thread of its own, one at a time (each holds a full model, and
    transformers' loading is not safe across threads), and each claimed in the state first, so that
    coordinators sharing a database finalize a job once."""

    def __init__(self, coordinator, log):
        self.c, self.log = coordinator, log
        self.threads: list[threading.Thread] = []
        self._running: set[str] = set()  # jobs this process is finalizing: poll need not try to claim them again
        self._one_at_a_time = threading.Lock()

    def start(self, job_id: str, take_over: bool = False) -> bool:
        """Finalize the job if this process wins its claim (`take_over`: whatever was claimed before)."""
        if not self.c.state.claim_finalization(job_id, self.c.now(), take_over):
            return False
        self._running.add(job_id)

        def work() -> None:
            try:
                with self._one_at_a_time:
                    finalize_job(self.c, job_id, self.log)
            finally:  # done or failed by now; `jobs finalize` may send it back, to be claimed afresh
                self._running.discard(job_id)
        self.threads.append(threading.Thread(target=work, name=f"finalize-{job_id}", daemon=True))
        self.threads[-1].start()
        return True

    def poll(self) -> None:
        """Start every finalizing job that no coordinator has claimed: one whose failed finalization is to run
        again (`offsite cloud jobs finalize`). `serve` calls this each second."""
        for job in self.c.state.jobs():
            if job.status == "finalizing" and job.job_id not in self._running:
                self.start(job.job_id)

    def busy(self) -> bool:
        return any(t.is_alive() for t in self.threads)
