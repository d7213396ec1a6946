"""Pick the text generator a worker or embedded run uses."""

from __future__ import annotations

import os

from shardgen.schemas.errors import InvalidParameter

from .generation import Generator
from .models.loader import LoadedModel

GENERATORS = ("engine", "hf-generate")
GENERATOR_ENV = "SHARDGEN_GENERATOR"
HF_BATCH_WITH_AUTO = 16
"""transformers' generate has no memory-sized batch: under batch_size="auto" it runs batches of this size."""


def make_generator(
    loaded: LoadedModel,
    batch_size: int | str,
    *,
    compile: bool = False,
    kind: str | None = None,
    max_memory: int | str | None = None,
) -> Generator:
    """The engine by default; `hf-generate` (plain transformers generate) for comparison or debugging.

    `batch_size` is a number of sequences, or "auto": the engine then sizes its KV cache per call to fit
    `max_memory` (bytes or a size such as "8GiB"; default: what the process holds plus what the device has free).
    """
    kind = kind or os.environ.get(GENERATOR_ENV) or "engine"
    if kind == "hf-generate":
        from .engine.hf_generate import HFGenerate

        return HFGenerate(loaded, batch_size=HF_BATCH_WITH_AUTO if batch_size == "auto" else batch_size)
    if kind == "engine":
        from .engine import Engine

        return Engine(loaded, batch_size=batch_size, compile=compile, max_memory=max_memory)
    raise InvalidParameter(f"unknown generator {kind!r} in {GENERATOR_ENV}", f"use one of {', '.join(GENERATORS)}")
