"""What `jobs create` checks before any data owner's token is spent: that the base's tokenizer can end and
pad an example, and that every `[eval]` file reads in its declared format and renders with that tokenizer
(a chat set needs a chat template). A job that would fail at finalization, after every round, fails here."""
from __future__ import annotations

from offsite import render
from offsite.errors import ConfigError, DataError
from offsite.textdata import Example, read_examples, read_tasks, read_texts


PROBE_CHAT = Example("fine", messages=(("user", "how are you?"), ("assistant", "fine")))


def check_job_data(tokenizer, eval_sets: dict[str, str], task_sets: dict[str, str], protection_data: str | None,
                   chat_template: str = "") -> None:
    """Raises ConfigError (the tokenizer, the job's chat template) or DataError naming the `[eval]` entry,
    its file and the cause. `tokenizer` carries the job's chat_template where it names one."""
    render.eos_id(tokenizer)
    if chat_template:
        try:
            render.render(tokenizer, PROBE_CHAT)
        except DataError as e:
            raise ConfigError(f"[job] chat_template cannot render a user and an assistant turn: {e}") from None
    for name, path in eval_sets.items():
        _each(f"[eval] sets.{name} ({path})", lambda e: render.render(tokenizer, e), read_examples(path))
    for name, path in task_sets.items():
        _each(f"[eval] tasks.{name} ({path})", lambda e: render.served_prompt(tokenizer, e), read_tasks(path))
    if protection_data:
        render.texts_ids(tokenizer, read_texts(protection_data))


def _each(where: str, encode, examples) -> None:
    if not examples:
        raise DataError(f"{where}: no examples")
    for i, example in enumerate(examples, 1):
        try:
            encode(example)
        except DataError as e:
            raise DataError(f"{where}, example {i}: {e}") from None
