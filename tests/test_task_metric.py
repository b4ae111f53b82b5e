"""The task metric: held-out match bulletins cut before the result their score determines, scored by exact
match of greedy decoding (batched, left-padded), on the system's own models."""
import random

import pytest
import torch

from offsite.demo import domain
from offsite.emulator.build import load_base
from offsite.emulator.evaluate import exact_match
from offsite.errors import DataError
from offsite.textdata import Example, read_tasks


def test_a_match_result_follows_from_its_score():
    r = random.Random(3)
    pairs = domain.match_results([domain.match(r) for _ in range(200)] + [domain.weather(r), domain.train_departure(r)])
    assert len(pairs) == 200  # only match bulletins
    for prompt, completion in pairs:
        home, away = _score(prompt)
        want = "home win" if home > away else "away win" if away > home else "draw"
        assert completion == f" ({want})" and not prompt.endswith(" ")
    assert {c for _, c in pairs} == {" (home win)", " (away win)", " (draw)"}


def _score(prompt: str) -> tuple[int, int]:
    score = next(w for w in prompt.split() if "-" in w and w.replace("-", "").isdigit())
    home, away = score.split("-")
    return int(home), int(away)


@pytest.fixture(scope="module")
def model(tiny_model):
    return load_base(str(tiny_model))


def _greedy(model, tokenizer, prompt: str, steps: int) -> str:
    """One prompt, unpadded: what the model says next."""
    ids = torch.tensor([[tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_exact_match_scores_what_greedy_decoding_says_batched_as_alone(model):
    full, tokenizer = model
    prompts = ["MATCH Monday: Harrow Town 3-1 Morley City", "WEATHER Kelso", "TRAIN Aldport to Brenham: departs 09:15 from"]
    said = [_greedy(full, tokenizer, p, 4) for p in prompts]
    assert all(said)
    right = [Example(s[:6], p) for p, s in zip(prompts, said)]  # a prefix of what it says is a match
    wrong = [Example("\u00a7" + s[:5], p) for p, s in zip(prompts, said)]  # no such continuation
    assert exact_match(full, tokenizer, right) == 1.0 and exact_match(full, tokenizer, wrong) == 0.0
    mixed = right + wrong
    assert exact_match(full, tokenizer, mixed, batch_size=len(mixed)) == 0.5  # prompts of different lengths, left-padded
    full.train()
    assert exact_match(full, tokenizer, mixed, batch_size=1) == 0.5
    assert full.training  # decoding ran in eval mode; the model's own mode is given back
    full.eval()


def test_task_sets_must_hold_prompts(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"prompt": "MATCH a 1-0 b", "completion": " (home win)"}\n')
    assert read_tasks(tmp_path / "t.jsonl") == [Example(" (home win)", "MATCH a 1-0 b")]
    (tmp_path / "plain.jsonl").write_text('{"text": "MATCH a 1-0 b (home win)."}\n')
    with pytest.raises(DataError, match="'prompt' and 'completion'"):
        read_tasks(tmp_path / "plain.jsonl")
