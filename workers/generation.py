"""The contract between shard processing and whatever generates text (the engine, or HF generate).

A generator takes tokenized prompts, each with its own seed, and returns one output per prompt, in order.
It knows nothing of shards, files or queues.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from shardgen.schemas.sampling import SamplingParams

FINISH_STOP = "stop"      # EOS, a stop token id or a stop string
FINISH_LENGTH = "length"  # max_new_tokens / max_length / context reached
FINISH_ERROR = "error"    # the row could not be generated; see GenerationOutput.error


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    seed: int = 0
    """Per-row seed: the same seed gives the same text whatever else shares the batch."""
    adapter: str | None = None
    """A LoRA adapter directory to serve this request with (vLLM), None for the model as loaded."""


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities at one generated position, from the model's raw logits (before repetition penalty,
    temperature and filters, as vLLM reports them): what the model thought, not what the sampler drew from."""

    token_id: int
    logprob: float
    """Of the token generated here."""
    top_token_ids: tuple[int, ...] = ()
    """The K most likely tokens here, most likely first (K = SamplingParams.logprobs)."""
    top_logprobs: tuple[float, ...] = ()


@dataclass
class Sample:
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprobs] | None = None
    """One entry per token of token_ids when SamplingParams.logprobs is set, else None."""


@dataclass
class GenerationOutput:
    samples: list[Sample] = field(default_factory=list)
    prompt_tokens: int = 0
    generation_time_s: float = 0.0
    """Seconds from the start of this request's prefill to its last token."""
    error: str | None = None

    @property
    def generated_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)

    @classmethod
    def failed(cls, message: str, prompt_tokens: int = 0) -> "GenerationOutput":
        return cls(samples=[], prompt_tokens=prompt_tokens, error=message)


def prompt_too_long(prompt_tokens: int, context_length: int) -> str | None:
    """Why a prompt cannot be generated from (no room left in the model's context), or None if it can."""
    if prompt_tokens < context_length:
        return None
    return (
        f"prompt has {prompt_tokens} tokens; the model's context is {context_length} tokens, leaving no room to "
        "generate: shorten the prompt or pass --max-prompt-tokens"
    )


def no_room_to_generate(prompt_tokens: int, params: SamplingParams) -> str | None:
    """Why `max_length` leaves this prompt nothing to generate, or None when it leaves room."""
    if params.new_token_budget(prompt_tokens) > 0:
        return None
    return (
        f"max_length={params.max_length} leaves no room to generate: the prompt alone has {prompt_tokens} tokens "
        f"(max_length counts the prompt and the answer); raise max_length above {prompt_tokens} or use max_new_tokens"
    )


def request_error(prompt_tokens: int, params: SamplingParams, context_length: int) -> str | None:
    """Why a request cannot be generated, or None. Every generator asks this one question before generating, so a
    row fails with the same message whichever generator, driver or API served it; the API raises it as
    InvalidParameter where a caller asked for one answer."""
    return prompt_too_long(prompt_tokens, context_length) or no_room_to_generate(prompt_tokens, params)


class GenerationCancelled(RuntimeError):
    """`should_stop` asked the generator to stop; outputs already passed to on_output stand."""


class EngineOOM(RuntimeError):
    """The device ran out of memory; the caller may retry with a smaller batch."""


OnOutput = Callable[[int, GenerationOutput], None]
"""Called as each request finishes, with its index in the request list (progress, heartbeats)."""


class Generator(Protocol):
    name: str
    batch_size: int

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        *,
        on_output: OnOutput | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[GenerationOutput]:
        ...
