"""Pick the text generator a worker or embedded run uses."""

from __future__ import annotations

import os

from shardgen.schemas.errors import InvalidParameter

from .generation import Generator
from .models.loader import LoadedModel

GENERATORS = ("engine", "hf-generate")
GENERATOR_ENV = "SHARDGEN_GENERATOR"


def make_generator(loaded: LoadedModel, batch_size: int | str, *, compile: bool = False, kind: str | None = None,
                   max_memory: int | str | None = None) -> Generator:
    """The engine by default; `hf-generate` (plain transformers generate) for comparison or debugging.
    `batch_size` may be "auto": the engine sizes each call's batch to what fits `max_memory`."""
    kind = kind or os.environ.get(GENERATOR_ENV) or "engine"
    if kind == "hf-generate":
        from .engine.hf_generate import HFGenerate

        return HFGenerate(loaded, batch_size=16 if batch_size == "auto" else batch_size)
    if kind == "engine":
        from .engine import Engine

        return Engine(loaded, batch_size=batch_size, compile=compile, max_memory=max_memory)
    raise InvalidParameter(f"unknown generator {kind!r} in {GENERATOR_ENV}", f"use one of {', '.join(GENERATORS)}")
