"""A tiny LLaMA-style model with its own tokenizer, built on the spot: what the tests and the benchmarks
run the whole system on without downloading anything."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from offsite.demo import domain
from offsite.demo.base import train_tokenizer


def make_tiny_model(out: Path, num_layers: int = 6, seed: int = 0, hidden_size: int = 32,
                    dtype: torch.dtype = torch.float32, max_shard_size: int | str = "50GB") -> Path:
    """Saved in `dtype` (as model owners store real bases: bf16 or fp16), in files of `max_shard_size`."""
    texts = domain.make_client_records(0, 3, 300, 0.34, seed=1)
    tokenizer = train_tokenizer(texts, vocab_size=300)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                  num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, tie_word_embeddings=True,
                                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(out))
    return out
