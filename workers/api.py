"""In-process Python API: load a model once, generate for prompts or conversations, stream one answer.

    from shardgen.workers import LLM
    llm = LLM(temperature=0.7, max_new_tokens=128)
    print(llm.generate("What is the capital of France?")[0].text)
    for piece in llm.stream("Tell me a story."):
        print(piece, end="")
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

from shardgen.schemas.errors import InvalidParameter
from shardgen.schemas.model import ModelSpec
from shardgen.schemas.run import row_seed
from shardgen.schemas.sampling import SamplingParams
from shardgen.schemas.shard import InputRow

from .engine import Engine, Finished, NewToken
from .generation import GenerationOutput, GenerationRequest, Sample
from .models.loader import LoadedModel, load_model
from .prompts import conversation, render_text, tokenize_text
from .engine.stop import truncate_at_stop

Message = Mapping[str, Any]


@dataclass
class Completion:
    """The result for one prompt: its n samples, first one first."""

    samples: list[Sample]
    prompt_tokens: int
    error: str | None = None
    """Why the prompt could not be generated (e.g. longer than the model's context); texts are then empty."""

    @property
    def text(self) -> str:
        return self.samples[0].text if self.samples else ""

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.samples]

    @property
    def finish_reason(self) -> str | None:
        return self.samples[0].finish_reason if self.samples else None

    @property
    def generated_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)

    @classmethod
    def from_output(cls, output: GenerationOutput) -> "Completion":
        return cls(output.samples, output.prompt_tokens, output.error)


class LLM:
    """A loaded model and the engine that runs it; generation parameters given here are the defaults."""

    def __init__(
        self,
        model: str = "smollm2-135m",
        *,
        device: str = "auto",
        quantize: str = "none",
        quantization_config: Mapping[str, Any] | None = None,
        batch_size: int = 16,
        dtype: str = "auto",
        trust_remote_code: bool = False,
        hf_token: str | None = None,
        chat_template: bool = True,
        system_prompt: str | None = None,
        **default_params: Any,
    ):
        SamplingParams.from_mapping(default_params)  # refuse bad defaults before the slow load
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InvalidParameter(f"batch_size must be a positive integer, got {batch_size!r}")
        spec = ModelSpec(
            model=model,
            quantize=quantize,
            quantization_config=dict(quantization_config or {}),
            dtype=dtype,
            trust_remote_code=trust_remote_code,
        )
        self.loaded: LoadedModel = load_model(spec, device, hf_token=hf_token)
        self.engine = Engine(self.loaded, batch_size=batch_size)
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.default_params = dict(default_params)

    @property
    def last_path(self) -> str:
        """Which generation path the last call ran (the engine, or transformers' generate for beam search)."""
        return self.engine.last_path

    def params(self, **params: Any) -> SamplingParams:
        """The defaults given at construction, overridden by `params` (user names and aliases accepted)."""
        return SamplingParams.from_mapping({**self.default_params, **params})

    def generate(self, prompts: str | Sequence[str], **params: Any) -> list[Completion]:
        """Complete each prompt (a user turn under the chat template, unless chat_template=False); input order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self._run([[{"role": "user", "content": p}] for p in prompts], params)

    def chat(self, conversations: Sequence[Sequence[Message]], **params: Any) -> list[Completion]:
        """Answer each conversation (a list of {"role", "content"} messages); input order."""
        if conversations and isinstance(conversations[0], Mapping):
            conversations = [conversations]  # type: ignore[list-item]
        return self._run([list(c) for c in conversations], params)

    def stream(self, prompt: str | Sequence[Message], **params: Any) -> Iterator[str]:
        """Yield the answer to one prompt (or conversation) in pieces as they are generated."""
        sampling = self.params(**params)
        if sampling.n != 1:
            raise InvalidParameter(f"stream makes one sample, got n={sampling.n}", "use generate for several samples")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        request = self._requests([messages], sampling)[0]
        tokens: list[int] = []
        sent = ""
        for event in self.engine.events([request], sampling):
            if isinstance(event, NewToken):
                tokens.append(event.token_id)
                text, _ = truncate_at_stop(self._decode(tokens), sampling.stop)
                ready = _settled_prefix(text, sampling.stop)
                if len(ready) > len(sent):
                    yield ready[len(sent) :]
                    sent = ready
            elif isinstance(event, Finished):
                if event.output.error:
                    raise InvalidParameter(event.output.error)
                final = event.output.samples[0].text
                if final.startswith(sent) and len(final) > len(sent):
                    yield final[len(sent) :]

    def __call__(self, prompt_text: str, max_length: int | None = None) -> str:
        """The answer to one prompt as a string (the old `Inference` interface)."""
        completion = self.generate(prompt_text, max_length=max_length)[0]
        if completion.error:
            raise InvalidParameter(completion.error)
        return completion.text

    run = __call__

    def _run(self, conversations: list[list[Message]], params: Mapping[str, Any]) -> list[Completion]:
        sampling = self.params(**params)
        outputs = self.engine.generate(self._requests(conversations, sampling), sampling)
        return [Completion.from_output(output) for output in outputs]

    def _requests(self, conversations: list[list[Message]], sampling: SamplingParams) -> list[GenerationRequest]:
        base_seed = sampling.seed if sampling.seed is not None else random.randrange(2**31)
        tokenizer = self.loaded.tokenizer
        requests = []
        for index, messages in enumerate(conversations):
            row = InputRow(index=index, id=str(index), messages=messages)
            text = render_text(tokenizer, conversation(row, self.system_prompt), self.chat_template)
            ids = tokenize_text(tokenizer, text, templated=self.chat_template).ids
            requests.append(GenerationRequest(ids, seed=row_seed(base_seed, index)))
        return requests

    def _decode(self, tokens: list[int]) -> str:
        return self.loaded.tokenizer.decode(tokens, skip_special_tokens=True)


def _settled_prefix(text: str, stop: Sequence[str]) -> str:
    """The part of the text that can no longer change: not a half-decoded character, not a possible stop start."""
    end = len(text.rstrip("\ufffd"))
    held = max(
        (size for s in stop for size in range(1, min(len(s) - 1, end) + 1) if text[end - size : end] == s[:size]),
        default=0,
    )
    return text[: end - held]
