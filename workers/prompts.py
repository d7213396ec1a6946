"""Turn an input row into prompt token ids: chat template (or raw text), system prompt, left truncation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shardgen.schemas.shard import InputRow


@dataclass
class PromptTokens:
    ids: list[int]
    truncated_from: int | None = None
    """Original token count when the prompt was cut from the left to fit max_prompt_tokens."""


@dataclass
class PromptText:
    text: str
    templated: bool
    """Whether the model's chat template rendered it (then it already holds its special tokens)."""


def conversation(row: InputRow, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """The chat messages for a row: its messages or its prompt as a user turn, after a system turn if any."""
    messages = list(row.messages) if row.messages is not None else [{"role": "user", "content": row.prompt or ""}]
    system = row.system if row.system is not None else system_prompt
    if system and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def render_prompt(tokenizer: Any, messages: list[dict[str, Any]], chat_template: bool) -> PromptText:
    """The chat template's text when asked for and the tokenizer has one; else the messages' contents joined.

    A base model has no chat template: its prompt is the raw text, tokenized the way the model expects."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        return PromptText(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), True)
    return PromptText("\n\n".join(str(m.get("content", "")) for m in messages), False)


def tokenize_row(
    tokenizer: Any,
    row: InputRow,
    *,
    chat_template: bool = True,
    system_prompt: str | None = None,
    max_prompt_tokens: int | None = None,
) -> PromptTokens:
    prompt = render_prompt(tokenizer, conversation(row, system_prompt), chat_template)
    return tokenize_text(tokenizer, prompt.text, max_prompt_tokens=max_prompt_tokens, templated=prompt.templated)


def tokenize_text(tokenizer: Any, text: str, *, max_prompt_tokens: int | None = None, templated: bool = True) -> PromptTokens:
    # A rendered chat template already holds its special tokens; raw text gets the tokenizer's own (e.g. BOS).
    ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        return PromptTokens(ids[len(ids) - max_prompt_tokens :], truncated_from=len(ids))
    return PromptTokens(ids)
