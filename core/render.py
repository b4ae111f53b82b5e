"""One rendering of every example into token ids and a loss mask, following the tokenizer's own conventions.

Client training, the central baseline, evaluation and the inference API's prompts all come from here, so
the model is served exactly the prefix it was trained on. Special tokens are added only where the
tokenizer's settings or its chat template put them, never twice:

- text: what the tokenizer makes of the text with its own special tokens (BOS where it adds one: LLaMA,
  Gemma, OPT; none where it has none: Qwen2, GPT-2), then EOS unless the tokenizer already ended with it.
  Every token is learned.
- prompt + completion: the prompt as the tokenizer encodes it alone (exactly what `/v1/completions`
  serves for it), then the completion's tokens and EOS, which are what is learned.
- chat: exactly `apply_chat_template(messages, tokenize=True)`: the template writes BOS and the end of
  each turn itself, so nothing is added. Learned: the tokens the template marks as the assistant's
  (`{% generation %}`) where it marks them, else what follows the served prompt,
  `apply_chat_template(messages[:-1], add_generation_prompt=True)`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from offsite.errors import ConfigError, DataError
from offsite.textdata import Example

_GENERATION = re.compile(r"{%-?\s*generation\s*-?%}")


@dataclass(frozen=True)
class Rendered:
    """Token ids and, per token, whether the loss learns it."""
    ids: list[int]
    learned: list[bool]

    def truncated(self, max_len: int) -> "Rendered":
        return Rendered(self.ids[:max_len], self.learned[:max_len])


def eos_id(tokenizer) -> int:
    """The tokenizer's end-of-text id; a tokenizer without one cannot end an example."""
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"the tokenizer ({type(tokenizer).__name__}) has no EOS token: set eos_token in its "
                          "tokenizer_config.json")
    return tokenizer.eos_token_id


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (padding is never learned)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)


def _own_many(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text with the tokenizer's own special tokens, less an EOS the tokenizer itself appends (a
    prompt goes on, and the caller decides where a text ends). One batched call for a whole corpus."""
    if not texts:
        return []
    out = [list(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    eos = tokenizer.eos_token_id
    for text, ids in zip(texts, out):
        if ids and ids[-1] == eos and tokenizer(text, add_special_tokens=False)["input_ids"][-1:] != [eos]:
            ids.pop()
    return out


def _own(tokenizer, text: str) -> list[int]:
    return _own_many(tokenizer, [text])[0]


def texts_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Plain texts: each with the tokenizer's special tokens, then EOS (once)."""
    eos = eos_id(tokenizer)
    return [ids + [eos] for ids in _own_many(tokenizer, list(texts))]


def text_ids(tokenizer, text: str) -> list[int]:
    return texts_ids(tokenizer, [text])[0]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A completion request's prompt, as served and as trained."""
    return _own(tokenizer, prompt)


def has_chat_template(tokenizer, template: str | None = None) -> bool:
    return bool(template or getattr(tokenizer, "chat_template", None))


def _messages(messages) -> list[dict]:
    return [m if isinstance(m, dict) else {"role": m[0], "content": m[1]} for m in messages]


def _template(tokenizer, messages: list[dict], template: str | None = None, **kwargs):
    if not has_chat_template(tokenizer, template):
        raise DataError("chat examples need a chat template, and this model's tokenizer has none: use "
                        "'prompt'/'completion' or 'text' examples, or a base whose tokenizer carries one")
    try:
        return tokenizer.apply_chat_template(messages, tokenize=True, chat_template=template or None, **kwargs)
    except Exception as e:  # jinja2's TemplateError, raise_exception() in templates that refuse a turn
        raise DataError(f"the chat template refuses this conversation: {type(e).__name__}: {e}") from None


def chat_prompt_ids(tokenizer, messages, template: str | None = None) -> list[int]:
    """A chat request's prompt: the conversation so far and the template's opening of the assistant turn
    (`template`: a job's own, where the tokenizer has none)."""
    return list(_template(tokenizer, _messages(messages), template, add_generation_prompt=True, return_dict=False))


def _chat(tokenizer, messages: list[dict]) -> Rendered:
    if _GENERATION.search(tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""):
        out = _template(tokenizer, messages, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
        if any(mask):
            return Rendered(ids, mask)
    ids = list(_template(tokenizer, messages, return_dict=False))
    prompt = chat_prompt_ids(tokenizer, messages[:-1])
    if ids[:len(prompt)] != prompt:
        raise DataError("the chat template renders the conversation so that the served prompt is not its prefix "
                        "(the assistant turn's opening differs): this template cannot be trained and served alike")
    return Rendered(ids, [i >= len(prompt) for i in range(len(ids))])


def served_prompt(tokenizer, example: Example) -> list[int]:
    """What the server is sent to answer `example`: its prompt, or its chat before the last assistant turn."""
    if example.messages:
        return chat_prompt_ids(tokenizer, example.messages[:-1])
    return prompt_ids(tokenizer, example.prompt)


def render(tokenizer, example: Example) -> Rendered:
    """`example` as the model is trained on it (see the module's docstring)."""
    if example.messages:
        return _chat(tokenizer, _messages(example.messages))
    if not example.prompt:
        ids = text_ids(tokenizer, example.completion)
        return Rendered(ids, [True] * len(ids))
    p = prompt_ids(tokenizer, example.prompt)
    c = list(tokenizer(example.completion, add_special_tokens=False)["input_ids"]) + [eos_id(tokenizer)]
    return Rendered(p + c, [False] * len(p) + [True] * len(c))
