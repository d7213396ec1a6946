"""Stop strings: cut generated text before the first one, and notice one as soon as its last token is generated.

Decoding a sample's whole text at every step costs time that grows with the square of its length. A sample's
text is instead decoded incrementally, as vLLM does: only a short window of its last tokens is decoded each
step, from a `prefix` offset whose text is known, so the tokens before it never need decoding again (and a
tokenizer that drops a leading space at the start of a decode drops it inside the window, where it cancels out).
The final text of a sample is still decoded once, whole, and cut with `truncate_at_stop`.
"""

from __future__ import annotations

from typing import Any, Sequence


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Text up to the earliest stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class IncrementalText:
    """The text of a growing list of token ids, decoding only the tail at each new token."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.text = ""
        self._prefix = 0  # tokens[:prefix] are settled and never decoded again
        self._read = 0  # text of tokens[prefix:read] is already part of self.text

    def add(self, token: int) -> str:
        """Append a token; returns the text it settles (empty while it ends in half a character)."""
        self.tokens.append(token)
        known = self._decode(self.tokens[self._prefix : self._read])
        window = self._decode(self.tokens[self._prefix :])
        if len(window) <= len(known) or window.endswith("\ufffd"):
            return ""
        new = window[len(known) :]
        self._prefix, self._read = self._read, len(self.tokens)
        self.text += new
        return new

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True) if tokens else ""


class StopScanner:
    """Whether a sample's text holds one of the stop strings yet, looking only at what each token added."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]):
        self.text = IncrementalText(tokenizer)
        self.stop = tuple(stop)
        self.overlap = max(len(s) for s in stop) - 1

    def add(self, token: int) -> bool:
        new = self.text.add(token)
        if not new:
            return False
        tail = self.text.text[-(len(new) + self.overlap) :]
        return any(s in tail for s in self.stop)
