"""Build an emulator bundle and the adapter skeleton from a base model."""
from __future__ import annotations

import dataclasses
import gc
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from offsite import lm, precision, render
from offsite.emulator.adapter import extract_adapter
from offsite.emulator.blocks import find_blocks, keep_blocks, num_blocks
from offsite.emulator.bundle import write_manifest
from offsite.emulator.config import EmulatorConfig
from offsite.emulator.distill import DistillConfig, distill
from offsite.emulator.extras import extra_names
from offsite.emulator.placement import Placement, onloaded
from offsite.emulator.plan import SplitPlan
from offsite.emulator.quantize import quantize_saved
from offsite.emulator.sharing import share_blocks
from offsite.emulator.strategy import low_rank_attention, middle_similarity, similarity_plan
from offsite.errors import ConfigError
from offsite.files import sha256_file
from offsite.textdata import read_texts


def load_tokenizer(path_or_id: str, chat_template: str | None = None):
    """The base's tokenizer; `chat_template`, a job's own, replaces the one it carries (or gives it one)."""
    tokenizer = AutoTokenizer.from_pretrained(path_or_id)
    if chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def load_base(path_or_id: str, placement: Placement | None = None, resident: tuple[str, ...] = (),
              chat_template: str | None = None):
    """Load a causal LM and its tokenizer from a local folder or a hub id, in the dtype its weights are
    stored in (transformers reads them straight into place: no fp32 copy of the model), where `placement`
    says (default: the CPU; `resident` modules are never offloaded to disk), ready to run
    (offsite.precision.prepare). `chat_template`: a job's own, for a base whose tokenizer has none."""
    placed = (placement or Placement()).load_kwargs(path_or_id, resident)
    model = AutoModelForCausalLM.from_pretrained(path_or_id, dtype="auto", **placed)
    tokenizer = load_tokenizer(path_or_id, chat_template)
    model.eval()
    return precision.prepare(model), tokenizer


def make_emulator(model, plan: SplitPlan):
    """Cut `model` in place down to the plan's emulator (adapter blocks + kept middle, shared if the plan
    says so)."""
    return share_blocks(keep_blocks(model, plan.emulator_order), plan)


@dataclass(frozen=True)
class BuildResult:
    bundle_dir: Path
    skeleton: dict[str, torch.Tensor]
    plan: SplitPlan
    full_params: int
    emulator_params: int
    adapter_params: int
    dtype: torch.dtype     # the base's: the bundle (what is not quantized) and the skeleton are stored in it


def choose_plan(model, tokenizer, cfg: EmulatorConfig) -> tuple[SplitPlan, list[list[float]] | None]:
    """The split: uniform drop, or one block per cluster of similar middle blocks (with the CKA matrix);
    with the parameters the adapter trains beyond its blocks (cfg.train_extra), and with the kept blocks
    shared over the spans they stand for (cfg.share_blocks)."""
    n, extras = num_blocks(model.config), extra_names(model, cfg.train_extra)
    if cfg.strategy == "uniform":
        plan = SplitPlan.uniform(n, cfg.bottom, cfg.top, cfg.emulator_layers)
        return dataclasses.replace(plan, extras=extras, repeats=plan.nearest_spans() if cfg.share_blocks else ()), None
    SplitPlan.uniform(n, cfg.bottom, cfg.top, cfg.emulator_layers)  # same validation of the numbers
    texts = read_texts(cfg.calibration_data or cfg.distill_data)
    windows = lm.pack(lm.encode(tokenizer, texts, max_len=10**9), 128)[:64]
    sim = middle_similarity(model, cfg.bottom, cfg.top, windows, render.pad_id(tokenizer))
    plan = dataclasses.replace(similarity_plan(n, cfg.bottom, cfg.top, cfg.emulator_layers, sim, cfg.share_blocks),
                               extras=extras)
    return plan, [[round(float(v), 4) for v in row] for row in sim]


def _distill_bf16(state) -> bool:
    """bf16 autocast where it pays on the device distillation runs on. Several CPU processes all take the
    main process's answer: a timing can come out differently in each, and they must run the same config."""
    if state is None:
        return lm.cpu_has_fast_bf16()
    if state.device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    from accelerate.utils import broadcast_object_list

    return bool(broadcast_object_list([lm.cpu_has_fast_bf16()])[0])


def build(base: str, cfg: EmulatorConfig, out_dir: str | Path, show_progress: bool = True,
          placement: Placement | None = None, chat_template: str | None = None) -> BuildResult:
    """Write the emulator bundle to `out_dir` and return the adapter skeleton (the base's adapter blocks).

    Without distillation the base is loaded once and cut in place: one copy of the model in memory.
    Distillation needs the full model as teacher, so it holds the full model and the emulator.
    Order: choose blocks, cut, low-rank attention, then distill (which can make up for the SVD).
    Under `accelerate launch` every process builds and distills its share; only the main one writes.
    `placement` says where the base is loaded (a device_map spreads it over devices, CPU and disk).
    `chat_template` (a job's own) is written into the bundle's tokenizer, so clients render chats with it.
    """
    out_dir = Path(out_dir)
    if placement and placement.device_map and cfg.distilled:
        raise ConfigError("distillation moves the teacher to one device: set device, not device_map, to distill")
    state = lm.launched_state()
    # offloaded blocks stay on disk; saving reads them back one by one. The bundle's tokenizer carries the job's template.
    full, tokenizer = load_base(base, placement, chat_template=chat_template)
    plan, similarity = choose_plan(full, tokenizer, cfg)
    full_params = sum(p.numel() for p in full.parameters())
    stored = precision.stored_dtype(full)
    skeleton = onloaded(full, extract_adapter(full, plan, on_emulator=False, dtype=stored))
    block_path = find_blocks(full).path
    teacher, emulator = ((full, make_emulator(load_base(base, placement)[0], plan)) if cfg.distilled
                         else (None, make_emulator(full, plan)))
    del full  # the emulator is what is left of it, or (distilled) `teacher` holds it until it is done
    if cfg.attn_rank:
        low_rank_attention(emulator, plan, cfg.attn_rank)
    distill_info = None
    if teacher is not None:
        dcfg = DistillConfig(steps=cfg.distill_steps, lr=cfg.distill_lr, batch_size=cfg.distill_batch_size,
                             seed=cfg.seed, bf16=_distill_bf16(state))
        windows = lm.pack(lm.encode(tokenizer, read_texts(cfg.distill_data), max_len=10**9), dcfg.seq_len)
        stats = distill(teacher, emulator, plan, windows, render.pad_id(tokenizer), dcfg,
                        checkpoint_dir=out_dir.parent / f".{out_dir.name}.distill", show_progress=show_progress)
        del teacher
        distill_info = {"data_sha256": sha256_file(cfg.distill_data), **asdict(dcfg), "processes": stats.processes,
                        "last_nmse": stats.last_nmse}
    emulator_params = sum(p.numel() for p in emulator.parameters())
    if state is None or state.is_main_process:
        provenance = {"strategy": cfg.strategy, "shared": cfg.share_blocks, "similarity": similarity, "attn_rank": cfg.attn_rank or None,
                      "distillation": distill_info, "quantized": cfg.quantize}
        out_dir.mkdir(parents=True, exist_ok=True)
        weights = precision.stored_state(emulator.state_dict(), stored)  # norms ran in fp32, distilled blocks trained in it
        if cfg.quantize:  # bitsandbytes packs while it loads: from a saved copy, with the emulator let go first
            with tempfile.TemporaryDirectory(prefix=".unpacked-", dir=out_dir.parent) as staging:
                emulator.save_pretrained(staging, safe_serialization=True, state_dict=weights)
                del emulator, weights
                gc.collect()
                quantize_saved(Path(staging), tokenizer, plan, block_path, cfg.quantize, out_dir)
        else:
            emulator.save_pretrained(str(out_dir), safe_serialization=True, state_dict=weights)
            tokenizer.save_pretrained(str(out_dir))
        base_hashes = ({p.name: sha256_file(p) for p in sorted(Path(base).glob("*.safetensors"))} if Path(base).is_dir()
                       else {"hub_id": base})
        write_manifest(out_dir, plan, block_path, {"base": base_hashes, **provenance})
    if state is not None:
        state.wait_for_everyone()  # no process returns before the bundle is there
    return BuildResult(
        bundle_dir=out_dir,
        skeleton=skeleton,
        plan=plan,
        full_params=full_params,
        emulator_params=emulator_params,
        adapter_params=sum(t.numel() for t in skeleton.values()),
        dtype=stored,
    )
