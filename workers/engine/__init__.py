"""The generation engine: continuous batching over a slot KV cache, chunked prefill, its own llama-family step."""

from .scheduler import (
    AUTO,
    PATH_BEAM_SEARCH,
    PATH_ENGINE,
    PATH_ENGINE_RECOMPUTE,
    PATH_UNSUPPORTED_CACHE,
    Engine,
    Event,
    Finished,
    NewToken,
)
from .stats import EngineStats

__all__ = [
    "AUTO",
    "Engine",
    "EngineStats",
    "Event",
    "Finished",
    "NewToken",
    "PATH_BEAM_SEARCH",
    "PATH_ENGINE",
    "PATH_ENGINE_RECOMPUTE",
    "PATH_UNSUPPORTED_CACHE",
]
