"""The demo's base model: a BPE tokenizer trained here and a small LLaMA-style decoder pretrained here.

Built once and cached: the folder carries a stamp of the settings that made it, and a later run with
the same settings reuses it.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from offsite import lm
from offsite.demo.corpus import general_corpus
from offsite.files import write_json

SPECIALS = ["<pad>", "<s>", "</s>"]


@dataclass(frozen=True)
class BaseConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 8
    num_heads: int = 4
    seq_len: int = 128
    batch_size: int = 32
    steps: int = 200            # ~0.8 M tokens; fewer leave middle blocks that barely matter (no protection)
    lr: float = 2e-3
    seed: int = 0


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    # Its convention, as LLaMA's: the tokenizer itself starts every text with <s> (offsite.render adds no BOS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def new_model(cfg: BaseConfig, tokenizer) -> torch.nn.Module:
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(config)


def prepare_base(out: Path, cfg: BaseConfig = BaseConfig(), log=print) -> Path:
    """Return a folder with the pretrained base, building it unless a matching one is cached."""
    stamp_path = out / "offsite-base.json"
    stamp = {"config": asdict(cfg), "torch": torch.__version__}
    if stamp_path.is_file() and json.loads(stamp_path.read_text()).get("settings") == stamp:
        log(f"base model: cached in {out}")
        return out
    train_text, held_text = general_corpus()
    log(f"base model: general corpus {sum(map(len, train_text)) / 1e6:.1f} MB train, "
        f"{sum(map(len, held_text)) / 1e6:.2f} MB held out")
    tokenizer = train_tokenizer(train_text, cfg.vocab_size)
    model = new_model(cfg, tokenizer)
    windows = lm.pack(lm.encode(tokenizer, train_text, max_len=10**9), cfg.seq_len)
    torch.manual_seed(cfg.seed)
    epochs = cfg.steps * cfg.batch_size / len(windows)
    stats = lm.train(model, windows, list(model.parameters()), tokenizer.pad_token_id,
                     lm.TrainConfig(epochs=epochs, lr=cfg.lr, batch_size=cfg.batch_size, warmup_steps=20,
                                    weight_decay=0.1, seed=cfg.seed, bf16=lm.cpu_has_fast_bf16(), max_steps=cfg.steps),
                     desc="pretrain base")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    write_json(out / "offsite-base.json", {"settings": stamp, "steps": stats.steps, "tokens": stats.tokens,
                                           "seconds": round(stats.seconds, 1), "last_loss": stats.last_loss,
                                           "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    log(f"base model: {stats.steps} steps, {stats.tokens / 1e6:.2f} M tokens in {stats.seconds:.0f} s "
        f"({stats.tokens_per_s:.0f} tok/s), last loss {stats.last_loss:.2f}")
    return out


def general_heldout(tokenizer, max_windows: int = 200, seq_len: int = 128) -> list[list[int]]:
    """Held-out general text in fixed windows, for the protection measurement."""
    _, held = general_corpus()
    return lm.pack(lm.encode(tokenizer, held, max_len=10**9), seq_len)[:max_windows]
