"""`offsite cloud export`: a job's latest global adapter, plugged into the full model (merged), or for a
LoRA job as a standard PEFT adapter on the full model (peft), for LoRA servers (vLLM, LoRAX)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from offsite import precision
from offsite.cloud.blobs import BlobStore
from offsite.cloud.job import Artifacts, JobConfig
from offsite.emulator import methods
from offsite.emulator.build import load_base
from offsite.emulator.bundle import read_manifest
from offsite.emulator.peft_export import LORA_METHODS, export_peft
from offsite.emulator.plugin import export, shard_size
from offsite.errors import ConfigError
from offsite.tensors import load_blob

FORMATS = ("merged", "peft")


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    format: str
    rounds: int            # global adapters aggregated into the export (0: the base's own blocks)
    detail: str


def export_job(cfg: JobConfig, artifacts: Artifacts, adapters: list[str], blobs: BlobStore, job_dir: Path, out_dir: str | Path,
               fmt: str, updates: int, rank: int | None = None) -> ExportResult:
    """Write the job's latest global adapter (the last of `adapters`, its global adapters in order) as `fmt`
    to `out_dir`. `updates` is how many client updates
    the job has aggregated: a LoRA export's default rank is the method's rank times that, the most the
    merged change can have (capped by the layers' widths)."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format must be one of {FORMATS}, got {fmt!r}")
    method = cfg.method_config()
    if fmt == "peft" and method.name not in LORA_METHODS:
        raise ConfigError(f"job {cfg.job_id} trains {method.name!r}: only a {' or '.join(LORA_METHODS)} job exports as a "
                          f"PEFT LoRA adapter; export it merged")
    rounds = len(adapters) - 1
    plan = artifacts.plan
    adapter = load_blob(blobs.open_path(adapters[-1]))
    block_path = read_manifest(artifacts.bundle_dir)["block_path"]
    full, tokenizer = load_base(cfg.base_model, cfg.placement(job_dir),
                                tuple(f"{block_path}.{i}" for i in plan.adapter_blocks), cfg.chat_template or None)
    dtype = cfg.resolved_dtype("export_dtype", precision.stored_dtype(full))
    out_dir = Path(out_dir)
    if fmt == "merged":
        plugged = methods.apply(full, plan, method, adapter, on_emulator=False, share=True)
        export(plugged, tokenizer, out_dir, dtype, shard_size(cfg.base_model))
        return ExportResult(out_dir, fmt, rounds, f"the full model with the adapter plugged in, {precision.dtype_name(dtype)}")
    widest = max(min(p.shape) for n, p in full.named_parameters() if p.dim() == 2 and n in adapter)
    chosen = rank or max(1, min(method.r * max(updates, 1), widest))
    result = export_peft(full, plan, adapter, out_dir, chosen, cfg.base_model, dtype)
    tokenizer.save_pretrained(str(out_dir))
    return ExportResult(out_dir, fmt, rounds, f"LoRA rank {result.rank} on {result.layers} layers; "
                                              + factor_verdict(result.max_relative_error, result.rank, widest))


EXACT_ERROR = 1e-3   # a change rebuilt this closely from its factors gives the merged model's outputs to rounding
CLOSE_ERROR = 5e-2   # within this, answers rarely change; above it the factors leave out a real part of the change


def factor_verdict(error: float, rank: int, widest: int) -> str:
    """The largest relative error of the LoRA factors, said with what it means and what to do about it."""
    said = f"largest relative error of the factors {error:.2e} (||BA - change|| / ||change||, worst layer): "
    if error <= EXACT_ERROR:
        return said + "exact to rounding; loaded with peft, the base gives the merged export's outputs"
    fix = (f"--rank {min(widest, rank * 2)} (up to {widest}) makes it closer, or export --format merged (exact)"
           if rank < widest else "export --format merged is exact")
    if error <= CLOSE_ERROR:
        return said + f"close: the rank-{rank} factors hold almost all of the change; outputs differ slightly from the merged export ({fix})"
    return said + f"approximate: rank {rank} leaves out part of the change, and outputs may differ from the merged export; {fix}"
