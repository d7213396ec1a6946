"""In-process Python API: load a model once, generate for prompts or conversations, stream one answer.

    from shardgen.workers import LLM
    llm = LLM(temperature=0.7, max_new_tokens=128)
    print(llm.generate("What is the capital of France?")[0].text)
    for piece in llm.stream("Tell me a story."):
        print(piece, end="")
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from shardgen.schemas.errors import InvalidParameter
from shardgen.schemas.model import QUANTIZATION_FIELDS, ModelSpec
from shardgen.schemas.run import row_seed
from shardgen.schemas.sampling import SamplingParams
from shardgen.schemas.shard import InputRow

from .engine import Finished, NewToken
from .engine.stop import truncate_at_stop
from .generation import GenerationOutput, GenerationRequest, Generator, Sample
from .generators import make_generator
from .models.default_model import DEFAULT_MODEL_ALIAS
from .models.loader import LoadedModel, load_model
from .prompts import tokenize_row

Message = Mapping[str, Any]


@dataclass
class Completion:
    """The result for one prompt: its n samples, first one first."""

    samples: list[Sample]
    prompt_tokens: int
    error: str | None = None
    """Why the prompt could not be generated (e.g. longer than the model's context); texts are then empty."""
    prompt_ids: list[int] = field(default_factory=list)
    """The prompt's token ids, as the model saw them (chat template and special tokens included)."""

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
    def from_output(cls, output: GenerationOutput, prompt_ids: list[int]) -> "Completion":
        return cls(output.samples, output.prompt_tokens, output.error, list(prompt_ids))


class LLM:
    """A loaded model and the generator that runs it; generation parameters given here are the defaults.

    Accepts the names users bring from transformers and the classes shardgen replaces: `model_id` for `model`,
    `device=None` for auto, torch dtype objects (or a BitsAndBytesConfig) in `quantization_config`, `use_cache`.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        model_id: str | None = None,
        tokenizer: str | None = None,
        device: str | None = "auto",
        quantize: str | bool | None = "none",
        quantization_config: Any = None,
        batch_size: int = 16,
        dtype: Any = "auto",
        trust_remote_code: bool = False,
        hf_token: str | None = None,
        chat_template: bool = True,
        system_prompt: str | None = None,
        use_cache: bool = True,
        **default_params: Any,
    ):
        check_use_cache(use_cache)
        default_params = without_use_cache(default_params)
        SamplingParams.from_mapping(default_params)  # refuse bad defaults before the slow load
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InvalidParameter(f"batch_size must be a positive integer, got {batch_size!r}")
        spec = ModelSpec(
            model=model_name(model, model_id),
            quantize=quantize,
            quantization_config=plain_quantization_config(quantization_config),
            dtype=dtype_name(dtype),
            trust_remote_code=trust_remote_code,
        )
        self.loaded: LoadedModel = load_model(spec, device, hf_token=hf_token, tokenizer_source=tokenizer)
        self.generator: Generator = make_generator(self.loaded, batch_size)
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.default_params = dict(default_params)

    @property
    def engine(self) -> Generator:
        """The generator (kept under its former name)."""
        return self.generator

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def last_path(self) -> str:
        """Which generation path the last call ran (the engine, or transformers' generate where the engine is not
        exact: beam search, some architectures)."""
        return getattr(self.generator, "last_path", None) or self.generator.name

    def params(self, **params: Any) -> SamplingParams:
        """The defaults given at construction, overridden by `params` (user names and aliases accepted)."""
        return SamplingParams.from_mapping({**self.default_params, **without_use_cache(params)})

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
        problem = no_room_error(sampling, len(request.prompt_ids))
        if problem:
            raise InvalidParameter(problem)
        tokens: list[int] = []
        sent = ""
        for event in self._events([request], sampling):
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
        requests = self._requests(conversations, sampling)
        outputs: list[GenerationOutput | None] = [None] * len(requests)
        runnable = []
        for index, request in enumerate(requests):
            problem = no_room_error(sampling, len(request.prompt_ids))
            if problem:
                outputs[index] = GenerationOutput.failed(problem, len(request.prompt_ids))
            else:
                runnable.append(index)
        generated = self.generator.generate([requests[i] for i in runnable], sampling) if runnable else []
        for index, output in zip(runnable, generated):
            outputs[index] = output
        return [Completion.from_output(o, r.prompt_ids) for o, r in zip(outputs, requests)]  # type: ignore[arg-type]

    def _events(self, requests: list[GenerationRequest], sampling: SamplingParams) -> Iterator[Any]:
        """Token events where the generator streams them; otherwise only the finished outputs."""
        events = getattr(self.generator, "events", None)
        if events is not None:
            yield from events(requests, sampling)
            return
        for index, output in enumerate(self.generator.generate(requests, sampling)):
            for token in output.samples[0].token_ids if output.samples else []:
                yield NewToken(index, 0, token, 0.0)
            yield Finished(index, output)

    def _requests(self, conversations: list[list[Message]], sampling: SamplingParams) -> list[GenerationRequest]:
        base_seed = sampling.seed if sampling.seed is not None else random.randrange(2**31)
        requests = []
        for index, messages in enumerate(conversations):
            row = InputRow(index=index, id=str(index), messages=messages)
            ids = tokenize_row(self.tokenizer, row, chat_template=self.chat_template, system_prompt=self.system_prompt).ids
            requests.append(GenerationRequest(ids, seed=row_seed(base_seed, index)))
        return requests

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def model_name(model: str | None, model_id: str | None) -> str:
    """`model`, or `model_id` as the classes shardgen replaces call it; the default model when neither is given."""
    if model is not None and model_id is not None and model != model_id:
        raise InvalidParameter(f"model {model!r} and model_id {model_id!r} disagree", "pass only one of them")
    return model or model_id or DEFAULT_MODEL_ALIAS


def check_use_cache(value: Any) -> None:
    """`use_cache` is accepted for code written for transformers. The engine always keeps a KV cache: the tokens
    are the same with or without one, so switching it off would only make generation slower."""
    if not isinstance(value, bool):
        raise InvalidParameter(f"use_cache must be true or false, got {value!r}")


def without_use_cache(params: Mapping[str, Any]) -> dict[str, Any]:
    params = dict(params)
    if "use_cache" in params:
        check_use_cache(params.pop("use_cache"))
    return params


def dtype_name(value: Any) -> Any:
    """`torch.bfloat16` -> "bfloat16"; anything else as it is (ModelSpec validates names)."""
    import torch

    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value


def plain_quantization_config(config: Any) -> dict[str, Any]:
    """A quantization_config as ModelSpec takes it: a mapping of plain values.

    Takes a dict whose values may be torch dtypes (`bnb_4bit_compute_dtype: torch.bfloat16`), or a transformers
    config object (BitsAndBytesConfig, GPTQConfig), of which the fields shardgen knows are kept."""
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        to_dict = getattr(config, "to_dict", None)
        if to_dict is None:
            raise InvalidParameter(
                f"quantization_config must be a dict or a transformers quantization config, got {type(config).__name__}"
            )
        config = {key: value for key, value in to_dict().items() if key in QUANTIZATION_FIELDS and value is not None}
    return {key: dtype_name(value) for key, value in config.items()}


def no_room_error(params: SamplingParams, prompt_tokens: int) -> str | None:
    """Why max_length leaves this prompt nothing to generate, or None when it leaves room."""
    if params.new_token_budget(prompt_tokens) > 0:
        return None
    return (
        f"max_length={params.max_length} leaves no room to generate: the prompt alone has {prompt_tokens} tokens "
        f"(max_length counts the prompt and the answer); raise max_length above {prompt_tokens} or use max_new_tokens"
    )


def _settled_prefix(text: str, stop: Sequence[str]) -> str:
    """The part of the text that can no longer change: not a half-decoded character, not a possible stop start."""
    end = len(text.rstrip("\ufffd"))
    held = max(
        (size for s in stop for size in range(1, min(len(s) - 1, end) + 1) if text[end - size : end] == s[:size]),
        default=0,
    )
    return text[: end - held]
