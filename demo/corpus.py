"""General (pretraining-domain) English text, made from the Python standard library's documentation.

Every Python 3.11 interpreter carries a few MB of English prose in its docstrings, comments and the
pydoc topic pages; extracting it needs no download and gives the same text on every machine with the
same Python. Files are split by a hash of their path into train and held-out parts.
"""
from __future__ import annotations

import ast
import hashlib
import io
import re
import sysconfig
import tokenize
from pathlib import Path

SKIP_PARTS = {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__"}


def _prose(text: str) -> str:
    text = re.sub(r"[ \t]+", " ", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _file_paragraphs(path: Path) -> list[str]:
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                out.append(_prose(doc))
    comments, run = [], []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and not tok.string.startswith("#!"):
            run.append(tok.string.lstrip("#").strip())
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT) and run:
            comments.append(" ".join(run))
            run = []
    out.extend(_prose(c) for c in comments if len(c) > 60)
    return out


def _topics() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return []
    return [_prose(topics[k]) for k in sorted(topics)]


def general_corpus() -> tuple[list[str], list[str]]:
    """(train, held_out) paragraphs; about 1 in 16 source files is held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_PARTS & set(rel.parts):
            continue
        try:
            paragraphs = _file_paragraphs(path)
        except (SyntaxError, UnicodeDecodeError, tokenize.TokenError):
            continue
        bucket = held if hashlib.sha256(str(rel).encode()).digest()[0] % 16 == 0 else train
        bucket.extend(paragraphs)
    train.extend(_topics())
    return train, held
