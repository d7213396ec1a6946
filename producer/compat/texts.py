"""What the replaced classes returned: the prompt followed by its continuation, decoded from the token ids, as
`tokenizer.decode(model.generate(...)[0], skip_special_tokens=True)` gives it."""

from __future__ import annotations

from typing import Any

from shardgen.schemas.errors import InvalidParameter
from shardgen.workers.api import LLM, Completion

# transformers' generate(do_sample=True) under a default generation config, which the replaced classes called.
SAMPLED_LIKE_GENERATE = {"temperature": 1.0, "top_k": 50}


def full_texts(llm: LLM, completion: Completion) -> list[str]:
    """Each sample of a completion as prompt + continuation; a completion that failed raises its error."""
    if completion.error:
        raise InvalidParameter(completion.error)
    return [llm.tokenizer.decode(completion.prompt_ids + s.token_ids, skip_special_tokens=True) for s in completion.samples]


def complete(llm: LLM, prompt: str, *, return_full_text: bool = True, **params: Any) -> list[str]:
    """The samples for one raw-text prompt, with the prompt in front unless return_full_text is False."""
    (completion,) = llm.generate(prompt, **params)
    if not return_full_text:
        if completion.error:
            raise InvalidParameter(completion.error)
        return completion.texts
    return full_texts(llm, completion)


def length_limit(max_length: int) -> dict[str, int]:
    """The seed classes capped prompt + answer with max_length alone; max_new_tokens must not cap it sooner."""
    return {"max_length": max_length, "max_new_tokens": max_length}
