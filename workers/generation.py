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
    params: SamplingParams | None = None
    """This request's own parameters (a row's per-row request), or None for the call's."""

    def params_or(self, default: SamplingParams) -> SamplingParams:
        return self.params if self.params is not None else default
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
    error: str | None = None
    """Set when the sample broke its constraint's structure (cut before it was complete): the text is kept, but
    it is not a valid instance."""
    parsed: str | None = None
    """Under a JSON schema, the text's value as JSON text (None when the text is not whole)."""


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

    @property
    def row_error(self) -> str | None:
        """The row's error: its own, or what went wrong with its samples' structure (naming the sample when n > 1)."""
        if self.error is not None:
            return self.error
        broken = [(i, s.error) for i, s in enumerate(self.samples) if s.error is not None]
        if not broken:
            return None
        if len(self.samples) == 1:
            return broken[0][1]
        return "; ".join(f"sample {i}: {error}" for i, error in broken)

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

Refill = Callable[[Callable[[GenerationRequest], bool]], Sequence[GenerationRequest]]
"""Asked by a generator that can take requests while it runs (`takes_refills`), whenever it has free slots and
nothing waiting: more requests for the same call, given a test of which ones fit what the call holds. The new
requests continue the call's indices (the first takes index len(requests), and so on)."""


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
