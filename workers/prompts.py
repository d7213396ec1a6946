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


def conversation(row: InputRow, system_prompt: str | None = None) -> list[dict[str, Any]]:
    """The chat messages for a row: its messages or its prompt as a user turn, after a system turn if any."""
    messages = list(row.messages) if row.messages is not None else [{"role": "user", "content": row.prompt or ""}]
    system = row.system if row.system is not None else system_prompt
    if system and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def render_text(tokenizer: Any, messages: list[dict[str, Any]], chat_template: bool) -> str:
    if chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(str(m.get("content", "")) for m in messages)


def tokenize_row(
    tokenizer: Any,
    row: InputRow,
    *,
    chat_template: bool = True,
    system_prompt: str | None = None,
    max_prompt_tokens: int | None = None,
) -> PromptTokens:
    text = render_text(tokenizer, conversation(row, system_prompt), chat_template)
    return tokenize_text(tokenizer, text, max_prompt_tokens=max_prompt_tokens, templated=chat_template)


def tokenize_text(tokenizer: Any, text: str, *, max_prompt_tokens: int | None = None, templated: bool = True) -> PromptTokens:
    # A rendered chat template already holds its special tokens; raw text gets the tokenizer's (e.g. BOS).
    ids = tokenizer(text, add_special_tokens=not templated)["input_ids"]
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        return PromptTokens(ids[len(ids) - max_prompt_tokens :], truncated_from=len(ids))
    return PromptTokens(ids)
