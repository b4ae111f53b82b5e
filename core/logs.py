"""Log output for every command: the human format, or one JSON object per line for log collectors."""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import TextIO

HUMAN = "%(asctime)s %(name)s %(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    """{"ts", "level", "logger", "msg"}, plus "exc" (the formatted traceback) when there is one. json.dumps
    escapes newlines, so a record is always exactly one line."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False)


# Third-party messages the user can do nothing about, each quieted for a stated reason.
QUIETED = {
    # bitsandbytes (0.49+), at import on CPUs with avx512_bf16, tries to fetch a faster 4-bit kernel from the
    # Hugging Face hub (code downloaded at run time); the hub's trust check refuses it, and bitsandbytes runs
    # its own kernel instead, which is what offsite tests. The warning it logs on every command says nothing
    # a user can act on.
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
}


def quiet_third_parties() -> None:
    for name, level in QUIETED.items():
        logging.getLogger(name).setLevel(level)


def log_handler(log_format: str, stream: TextIO | None = None) -> logging.Handler:
    """A stderr (or `stream`) handler writing `log_format` "text" or "json"."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(HUMAN, datefmt="%H:%M:%S"))
    return handler
