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
from shardgen.schemas.runtime import RuntimeOptions
from shardgen.schemas.sampling import SamplingParams
from shardgen.schemas.shard import InputRow

from .generation import GenerationOutput, GenerationRequest, Sample
from .generators import load_generator
from .models.default_model import DEFAULT_MODEL_ALIAS
from .prompts import tokenize_row
from .streaming import text_stream, token_stream

Message = Mapping[str, Any]


@dataclass
class Completion:
    """The result for one prompt: its n samples, first one first."""

    samples: list[Sample]
    prompt_tokens: int
    error: str | None = None
    """Why the prompt could not be generated (e.g. longer than the model's context; texts are then empty), or
    why a constrained text is not a whole instance of its structure (cut by max_new_tokens; the text is kept)."""
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

    @property
    def parsed(self) -> Any:
        """Under a JSON schema, the first sample's value (None when its text is not whole)."""
        import json

        first = self.samples[0].parsed if self.samples else None
        return json.loads(first) if first is not None else None

    @classmethod
    def from_output(cls, output: GenerationOutput, prompt_ids: list[int]) -> "Completion":
        return cls(output.samples, output.prompt_tokens, output.row_error, list(prompt_ids))


class LLM:
    """A loaded model and the generator that runs it; generation parameters given here are the defaults.

    Accepts the names users bring from transformers and the classes shardgen replaces: `model_id` for `model`,
    `device=None` for auto, torch dtype objects (or a BitsAndBytesConfig) in `quantization_config`, `use_cache`.
    How it runs (device, engine, batch size, memory budget, compile, token) is one RuntimeOptions, built as the
    CLI builds it: what is given here, then the SHARDGEN_* environment, then the defaults.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        model_id: str | None = None,
        tokenizer: str | None = None,
        device: str | None = None,
        engine: str | None = None,
        batch_size: int | str | None = None,
        max_memory: int | str | None = None,
        compile: bool | None = None,
        quantize: str | bool | None = "none",
        quantization_config: Any = None,
        dtype: Any = "auto",
        trust_remote_code: bool = False,
        hf_token: str | None = None,
        chat_template: bool = True,
        system_prompt: str | None = None,
        **default_params: Any,
    ):
        SamplingParams.from_mapping(default_params)  # refuse bad defaults before the slow load
        self.runtime = RuntimeOptions.from_options({
            "device": device, "engine": engine, "batch_size": batch_size, "max_memory": max_memory,
            "compile": compile, "hf_token": hf_token,
        })
        spec = ModelSpec(
            model=model_name(model, model_id),
            quantize=quantize,
            quantization_config=plain_quantization_config(quantization_config),
            dtype=dtype_name(dtype),
            trust_remote_code=trust_remote_code,
        )
        self.loaded, self.generator = load_generator(spec, self.runtime, tokenizer_source=tokenizer)
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.default_params = dict(default_params)

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
        return SamplingParams.from_mapping({**self.default_params, **params})

    def generate(self, prompts: str | Sequence[str], **params: Any) -> list[Completion]:
        """Complete each prompt (a user turn under the chat template, unless chat_template=False); input order.
        A prompt that cannot be generated from (longer than the context, no room under max_length) gets a
        Completion with its `error` set; the others are generated."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return self._run([[{"role": "user", "content": p}] for p in prompts], params)

    def chat(self, conversations: Sequence[Sequence[Message]], **params: Any) -> list[Completion]:
        """Answer each conversation (a list of {"role", "content"} messages); input order."""
        if conversations and isinstance(conversations[0], Mapping):
            conversations = [conversations]  # type: ignore[list-item]
        return self._run([list(c) for c in conversations], params)

    def stream(self, prompt: str | Sequence[Message], **params: Any) -> Iterator[str]:
        """Yield the answer to one prompt (or conversation) in pieces as they are generated. A prompt that cannot
        be generated from raises InvalidParameter with the reason."""
        sampling = self.params(**params)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        request = self._requests([messages], sampling)[0]
        yield from text_stream(self.tokenizer, token_stream(self.generator, request, sampling), sampling.stop)

    def _run(self, conversations: list[list[Message]], params: Mapping[str, Any]) -> list[Completion]:
        sampling = self.params(**params)
        requests = self._requests(conversations, sampling)
        outputs = self.generator.generate(requests, sampling) if requests else []
        return [Completion.from_output(o, r.prompt_ids) for o, r in zip(outputs, requests)]

    def _requests(self, conversations: list[list[Message]], sampling: SamplingParams) -> list[GenerationRequest]:
        base_seed = sampling.seed if sampling.seed is not None else random.randrange(2**31)
        requests = []
        for index, messages in enumerate(conversations):
            row = InputRow(index=index, id=str(index), messages=messages)
            ids = tokenize_row(self.tokenizer, row, chat_template=self.chat_template, system_prompt=self.system_prompt).ids
            requests.append(GenerationRequest(ids, seed=row_seed(base_seed, index)))
        return requests


def model_name(model: str | None, model_id: str | None) -> str:
    """`model`, or `model_id` as the classes shardgen replaces call it; the default model when neither is given."""
    if model is not None and model_id is not None and model != model_id:
        raise InvalidParameter(f"model {model!r} and model_id {model_id!r} disagree", "pass only one of them")
    return model or model_id or DEFAULT_MODEL_ALIAS


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
