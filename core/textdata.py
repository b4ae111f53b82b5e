"""Reading the data files people give us, with errors that name the file and line."""
from __future__ import annotations

import json
from pathlib import Path

from offsite.errors import DataError


def read_texts(path: str | Path) -> list[str]:
    """Texts of a JSONL file with a `text` field, or the paragraphs of a .txt file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    if path.suffix == ".txt":
        paragraphs = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        if not paragraphs:
            raise DataError(f"{path}: no text")
        return paragraphs
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
                raise DataError(f"{path}:{lineno}: expected an object with a non-empty string field 'text'")
            texts.append(row["text"])
    if not texts:
        raise DataError(f"{path}: no examples")
    return texts
