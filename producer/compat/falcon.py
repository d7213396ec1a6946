"""The Falcon text-generation pipeline: a 4-bit Falcon model answering `pipeline(prompt, max_length, top_k, ...)`.

    falcon = FalconInference("tiiuae/falcon-7b-instruct", quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    for seq in falcon.prompt(query):      # or falcon(prompt, max_length=300, do_sample=True, top_k=10)
        print(seq["generated_text"])
"""

from __future__ import annotations

from typing import Any

from shardgen.schemas.errors import InvalidParameter
from shardgen.workers.api import LLM

from .texts import complete, length_limit


class FalconInference:
    """Called like the pipeline it replaces; returns `[{"generated_text": prompt + continuation}, ...]`.

    Falcon checkpoints of both layouts (the new decoder, and the 7B-style multi-query / parallel attention) run
    natively in transformers, so `trust_remote_code` is not needed (it is passed on when given)."""

    def __init__(
        self,
        model: str = "tiiuae/falcon-7b-instruct",
        *,
        quantization_config: Any = None,
        device: str | None = None,
        max_length: int = 300,
        top_k: int = 10,
        num_return_sequences: int = 1,
        **options: Any,
    ):
        self.max_length = max_length
        self.top_k = top_k
        self.num_return_sequences = num_return_sequences
        self.llm = LLM(model, device=device, quantization_config=quantization_config, chat_template=False, **options)
        self.device = self.llm.loaded.device
        self.model = self.llm.loaded.model
        self.tokenizer = self.llm.tokenizer

    def __call__(self, prompt: str, *args: Any, **kwargs: Any) -> list[dict[str, str]]:
        """The pipeline's answer: one `{"generated_text": ...}` per returned sequence (arguments as `generate`)."""
        return [{"generated_text": text} for text in self.generate(prompt, *args, **kwargs)]

    def prompt(
        self, query: str, max_length: int | None = None, top_k: int | None = None,
        num_return_sequences: int | None = None, **params: Any,
    ) -> list[dict[str, str]]:
        """The document's pipeline function: put a query in, get the pipeline's generated sequences out.

        `max_length`, `top_k` and `num_return_sequences` default to the values given at construction (300, 10
        and 1 unless changed); other `generate` arguments (`do_sample`, `eos_token_id`, ...) pass through."""
        if not isinstance(query, str) or not query.strip():
            raise InvalidParameter(f"query must be a non-empty string, got {query!r}")
        returned = {"max_length": max_length, "top_k": top_k, "num_return_sequences": num_return_sequences}
        return self(query, **returned, **params)

    def generate(
        self,
        prompt: str,
        max_length: int | None = None,
        do_sample: bool = True,
        top_k: int | None = None,
        num_return_sequences: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **params: Any,
    ) -> list[str]:
        """The generated texts alone, prompt in front unless `return_full_text=False`."""
        sampling = {
            "do_sample": do_sample,
            "top_k": top_k if top_k is not None else self.top_k,
            "num_return_sequences": num_return_sequences or self.num_return_sequences,
            **length_limit(max_length or self.max_length),
        }
        if eos_token_id is not None:
            sampling["stop_token_ids"] = eos_token_id
        return complete(self.llm, prompt, **{**sampling, **params})
