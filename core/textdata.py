"""Reading the data files people give us, with errors that name the file and line.

Formats: JSONL with `text`, with `prompt` + `completion` (loss on the completion only), or with chat
`messages` (rendered with the tokenizer's chat template at encoding time; the last message is the
assistant turn that is learned); CSV with a named text column (or `prompt` and `completion` columns);
plain .txt, one example per paragraph.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from offsite.errors import DataError

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Example:
    """One training example: `prompt` is context (no loss), `completion` is learned. A chat keeps its
    `messages` until a tokenizer renders them."""
    completion: str
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()


def _from_record(row, where: str) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with 'text', 'prompt' and 'completion', or 'messages'")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs):
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} with role in {ROLES}")
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            raise DataError(f"{where}: the last message must be a non-empty assistant turn (it is what is learned)")
        return Example(msgs[-1]["content"], messages=tuple((m["role"], m["content"]) for m in msgs))
    if "prompt" in row or "completion" in row:
        prompt, completion = row.get("prompt"), row.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str) or not completion.strip():
            raise DataError(f"{where}: 'prompt' and 'completion' must be strings, the completion non-empty")
        return Example(completion, prompt)
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: expected a non-empty string field 'text' (or 'prompt' and 'completion', or 'messages')")
    return Example(text)


def read_examples(path: str | Path, text_column: str = "text") -> list[Example]:
    """Every example of a data file, checked before any training; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    if path.suffix == ".txt":
        out = [Example(p.strip()) for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    elif path.suffix == ".csv":
        out = _read_csv(path, text_column)
    else:
        out = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                out.append(_from_record(row, f"{path}:{lineno}"))
    if not out:
        raise DataError(f"{path}: no examples")
    return out


def _read_csv(path: Path, text_column: str) -> list[Example]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        pair = "prompt" in columns and "completion" in columns
        if not pair and text_column not in columns:
            raise DataError(f"{path}:1: no column {text_column!r} (columns: {columns}); name it with --text-column")
        out = []
        for row in reader:  # reader.line_num counts physical lines, quoted newlines included
            row = {"prompt": row["prompt"], "completion": row["completion"]} if pair else {"text": row[text_column]}
            out.append(_from_record(row, f"{path}:{reader.line_num}"))
        return out


def read_tasks(path: str | Path) -> list[Example]:
    """Prompts with the completion they determine (task sets: scored by exact match of greedy decoding)."""
    examples = read_examples(path)
    if not all(e.prompt and not e.messages for e in examples):
        raise DataError(f"{path}: expected 'prompt' and 'completion' examples here")
    return examples


def read_texts(path: str | Path) -> list[str]:
    """Plain texts (general text, evaluation sets): every example must be a `text`."""
    examples = read_examples(path)
    if any(e.prompt or e.messages for e in examples):
        raise DataError(f"{path}: expected plain 'text' examples here")
    return [e.completion for e in examples]
