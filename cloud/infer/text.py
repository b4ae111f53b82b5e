"""Tokens to text as they arrive: what can be shown so far, and where a stop string ends it.

Text is decoded from all tokens each time (a token's text can depend on its neighbours) and only what is
certain is handed on: not a trailing partial UTF-8 character, nor a tail that could still become a stop
string."""
from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self._tokenizer, self._stops = tokenizer, tuple(s for s in stops if s)
        self._ids: list[int] = []
        self._shown = 0
        self.text = ""            # everything shown so far
        self.stopped = False

    def add(self, token: int) -> str:
        """The new text this token makes certain ("" if none yet)."""
        self._ids.append(token)
        full = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        for stop in self._stops:
            at = full.find(stop)
            if at != -1:
                self.stopped = True
                return self._show(full[:at])
        safe = len(full.rstrip("\ufffd"))
        for stop in self._stops:   # hold back a tail that is the start of a stop string
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if full[safe - k:safe] == stop[:k]:
                    safe -= k
                    break
        return self._show(full[:safe])

    def finish(self) -> str:
        """The rest, once no more tokens come."""
        if self.stopped:
            return ""
        return self._show(self._tokenizer.decode(self._ids, skip_special_tokens=True))

    def _show(self, text: str) -> str:
        if len(text) <= self._shown:
            return ""
        delta, self._shown = text[self._shown:], len(text)
        self.text += delta
        return delta
