"""`offsite cloud eval`: a job's model, and its base, scored on a file the model owner holds, in any data
format (text, prompt/completion, chat): the mean loss on the learned tokens, and exact match of greedy
decoding on the examples whose completion is a short answer. One model in memory: the base is scored,
then the job's latest global adapter is plugged into it and it is scored again."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from offsite import lm, render
from offsite.cloud.job import Artifacts, JobConfig
from offsite.emulator import methods
from offsite.emulator.build import load_base
from offsite.emulator.bundle import read_manifest
from offsite.emulator.evaluate import answerable, exact_match
from offsite.errors import DataError
from offsite.textdata import read_examples


@dataclass(frozen=True)
class FileScores:
    data: str
    examples: int
    learned_tokens: int
    loss: dict[str, float]                 # "base", "plug_in": mean loss per learned token (nats)
    answerable: int                        # examples scored by exact match
    exact_match: dict[str, float] | None   # "base", "plug_in"; None where no example is a short answer

    def to_dict(self) -> dict:
        return asdict(self)


def score_file(cfg: JobConfig, artifacts: Artifacts, adapter: dict, job_dir: Path, data: str | Path,
               max_length: int | None = None) -> FileScores:
    examples = read_examples(data)
    if not examples:
        raise DataError(f"{data}: no examples")
    plan = artifacts.plan
    block_path = read_manifest(artifacts.bundle_dir)["block_path"]
    written = (*(f"{block_path}.{i}" for i in plan.adapter_blocks), *(n.rpartition(".")[0] for n in plan.extras))
    full, tokenizer = load_base(cfg.base_model, cfg.placement(job_dir), written, cfg.chat_template or None)
    rows = lm.encode_examples(tokenizer, examples, max_length or cfg.max_length)
    pad, short = render.pad_id(tokenizer), answerable(tokenizer, examples)
    learned = sum(len(r) if isinstance(r, list) else sum(r[1]) for r in rows)
    loss, em = {}, {}
    for name, model in (("base", full), ("plug_in", None)):
        if model is None:  # the adapter goes into the base in place: still one model in memory
            model = methods.apply(full, plan, cfg.method_config(), adapter, on_emulator=False, share=True)
        loss[name] = round(lm.mean_token_loss(model, rows, pad), 4)
        if short:
            em[name] = round(exact_match(model, tokenizer, short), 4)
    return FileScores(str(data), len(examples), learned, loss, len(short), em or None)
