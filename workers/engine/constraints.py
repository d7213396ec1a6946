"""Constrained decoding: a sample's text follows a JSON schema, a regular expression or a list of choices.

The library is xgrammar. A `Grammars` object per tokenizer compiles each distinct constraint once (xgrammar's
compiler caches by grammar, and so does `Grammars`), and each constrained sample gets its own matcher, which
follows the tokens the sample generates. At each step the matchers of the constrained rows fill one packed bitmask
([rows, ceil(V / 32)] int32, one bit per token) and one call masks the disallowed tokens of those rows to -inf in
the batch's logits, before the penalty-free sampling functions (sampling.py) choose. Unconstrained rows are not
touched, so rows with and without a constraint share a batch and each row's text is what it would be alone.

A sample cut (by max_new_tokens, a stop string or the context) before its structure is complete is never passed
off as valid: `check_text` gives it an error, and a JSON schema's text is parsed into `parsed` only when whole.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from shardgen.schemas.errors import InvalidParameter
from shardgen.schemas.sampling import SamplingParams

Constraint = tuple[str, Any]
"""SamplingParams.constraint: ("json_schema", text), ("regex", pattern) or ("choice", (str, ...))."""


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose language is exactly `choices` (each a JSON-escaped literal)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def library_message(exc: Exception) -> str:
    """xgrammar's error as one line, without its "[time] file.cc:line:" prefix."""
    lines = str(exc).strip().splitlines()
    return re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", lines[0]) if lines else type(exc).__name__


def check_constraint(params: SamplingParams) -> None:
    """Refuse, with one line, a constraint the library cannot turn into a grammar (no tokenizer needed), so a
    run's own constraint fails before anything is queued rather than on every row."""
    if params.constraint is None:
        return
    import xgrammar

    kind, value = params.constraint
    try:
        if kind == "json_schema":
            xgrammar.Grammar.from_json_schema(value, any_whitespace=False, strict_mode=True)
        elif kind == "regex":
            xgrammar.Grammar.from_regex(value)
        else:
            xgrammar.Grammar.from_ebnf(choice_grammar(value))
    except Exception as exc:
        raise InvalidParameter(f"{kind} cannot be used for constrained decoding ({library_message(exc)})",
                               f"simplify the {kind.replace('_', ' ')}") from None


class Grammars:
    """Compiled grammars for one tokenizer and vocabulary, each distinct constraint compiled once."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]):
        import xgrammar

        self._xgr = xgrammar
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2)
        self._compiled: dict[Constraint, Any] = {}

    def compile(self, constraint: Constraint) -> Any:
        """The compiled grammar of a constraint; InvalidParameter (one line) if the library refuses it."""
        found = self._compiled.get(constraint)
        if found is None:
            found = self._compiled[constraint] = self._compile(*constraint)
        return found

    def _compile(self, kind: str, value: Any) -> Any:
        try:
            if kind == "json_schema":
                return self.compiler.compile_json_schema(value, any_whitespace=False, strict_mode=True)
            if kind == "regex":
                return self.compiler.compile_regex(value)
            if kind == "choice":
                return self.compiler.compile_grammar(choice_grammar(value))
        except Exception as exc:  # xgrammar raises RuntimeError or its own errors for what it cannot compile
            raise InvalidParameter(f"{kind} cannot be compiled for constrained decoding ({library_message(exc)})",
                                   f"simplify the {kind.replace('_', ' ')}") from None
        raise InvalidParameter(f"unknown constraint kind {kind!r}")

    def matcher(self, params: SamplingParams) -> "RowMatcher | None":
        """A fresh matcher for one sample under `params`, or None when it is unconstrained."""
        if params.constraint is None:
            return None
        return RowMatcher(self._xgr.GrammarMatcher(self.compile(params.constraint)))

    def bitmask(self, rows: int) -> torch.Tensor:
        return self._xgr.allocate_token_bitmask(rows, self.vocab_size)

    def apply(self, logits: torch.Tensor, matchers: Sequence["RowMatcher | None"], bitmask: torch.Tensor) -> None:
        """Mask, in place, the tokens row i's matcher does not allow (rows without a matcher are left as they are)."""
        # logits: [B, V]; bitmask: [>= B, ceil(V / 32)] int32, scratch space reused between steps
        rows = [i for i, m in enumerate(matchers) if m is not None and not m.done]
        if not rows:
            return
        for i in rows:
            matchers[i].fill(bitmask, i)  # type: ignore[union-attr]
        self._xgr.apply_token_bitmask_inplace(logits, bitmask[: logits.shape[0]].to(logits.device),
                                              vocab_size=min(self.vocab_size, logits.shape[-1]), indices=rows)


@dataclass
class RowMatcher:
    """Where one sample stands in its grammar."""

    matcher: Any
    rejected: bool = False
    """A token the grammar did not allow was forced in (cannot happen under the mask; kept as a guard)."""

    @property
    def done(self) -> bool:
        return self.matcher.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self.matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated() and not self.matcher.accept_token(token):
            self.rejected = True

    @property
    def complete(self) -> bool:
        """The text so far is a whole instance of the structure (it may end here)."""
        return not self.rejected and (self.matcher.is_terminated() or self.matcher.is_completed())


@dataclass(frozen=True)
class Checked:
    error: str | None = None
    parsed: str | None = None
    """A JSON schema's value as canonical JSON text, when the text is whole."""


def check_text(params: SamplingParams, text: str, complete: bool, finish_reason: str, cut_by_stop: bool) -> Checked:
    """Whether a constrained sample's final text is a whole instance of its structure; None fields when unconstrained."""
    constraint = params.constraint
    if constraint is None:
        return Checked()
    kind = constraint[0].replace("_", " ")
    if cut_by_stop:
        return Checked(f"a stop string cut the text before its {kind} was complete: drop --stop for constrained runs")
    if not complete:
        return Checked(f"the text ends before its {kind} is complete (finish_reason {finish_reason}: "
                       f"max_new_tokens={params.max_new_tokens} was reached first): raise max_new_tokens")
    if constraint[0] != "json_schema":
        return Checked()
    try:
        value = json.loads(text)
    except ValueError as exc:
        return Checked(f"the text is not valid JSON ({exc})")
    return Checked(parsed=json.dumps(value, ensure_ascii=False))
