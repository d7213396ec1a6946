"""Mini-LLM's `Generator`: a checkpoint and a tokenizer behind generate / generate_batch / streaming.

    gen = Generator(checkpoint_path="out/model", tokenizer_path="Tokenizer/BPE", device="cuda")
    print(gen.generate("Once upon a time", max_new_tokens=50, temperature=0.8, top_p=0.95))
    for token in gen.generate_stream("Once upon a time"):
        print(gen.tokenizer.decode([token]), end="", flush=True)
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterator, Sequence

from shardgen.schemas.run import row_seed
from shardgen.workers.api import LLM
from shardgen.workers.generation import GenerationRequest
from shardgen.workers.prompts import tokenize_text
from shardgen.workers.streaming import token_stream

from .texts import full_texts


class Generator:
    """The checkpoint must be one transformers can build: a directory written by `save_pretrained` (or a GGUF
    file). A raw `torch.save` state dict (`ckpt.pt`) holds weights but no architecture, and is refused with a line
    saying so. `device=None` picks a GPU when there is one; shardgen's engine keeps the KV cache itself.

    As the original, the prompt is raw text and `generate` returns it followed by the continuation."""

    def __init__(self, checkpoint_path: str, tokenizer_path: str | None = None, device: str | None = None, **options: Any):
        self.checkpoint_path = str(checkpoint_path)
        self.tokenizer_path = str(tokenizer_path) if tokenizer_path else None
        tokenizer = self.tokenizer_path if self.tokenizer_path and not _same_place(self.tokenizer_path, self.checkpoint_path) else None
        self.llm = LLM(self.checkpoint_path, tokenizer=tokenizer, device=device, chat_template=False, **options)
        self.device = self.llm.loaded.device
        self.model = self.llm.loaded.model
        self.tokenizer = self.llm.tokenizer

    def generate(self, prompt: str, max_new_tokens: int = 50, temperature: float = 0.7, top_p: float = 0.9, **params: Any) -> str:
        return self.generate_batch([prompt], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, **params)[0]

    def generate_batch(
        self,
        prompts: Sequence[str],
        batch_size: int | None = None,
        max_new_tokens: int = 50,
        temperature: float = 0.7,
        top_p: float = 0.9,
        **params: Any,
    ) -> list[str]:
        """One text per prompt, in order. `batch_size` is accepted: the engine batches continuously on its own."""
        completions = self.llm.generate(
            list(prompts), max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, **params
        )
        return [full_texts(self.llm, c)[0] for c in completions]

    def generate_stream(
        self, prompt: str, max_new_tokens: int = 50, temperature: float = 0.7, top_p: float = 0.9, **params: Any
    ) -> Iterator[int]:
        """The continuation's token ids, each as it is generated: `tokenizer.decode([token])` prints it, as in
        Mini-LLM. The same seed gives the tokens `generate` continues the prompt with. (`LLM.stream` yields
        text pieces.)"""
        sampling = self.llm.params(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   **params)
        prompt_ids = tokenize_text(self.tokenizer, prompt, templated=False).ids  # raw text, as generate sends
        seed = row_seed(sampling.seed if sampling.seed is not None else random.randrange(2**31), 0)
        yield from token_stream(self.llm.generator, GenerationRequest(prompt_ids, seed=seed), sampling)


def _same_place(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return a == b
