"""The generation engine: continuous batching over a slot KV cache, its own llama-family steps, sampling."""

from .scheduler import (
    PATH_BEAM_SEARCH,
    PATH_ENGINE,
    PATH_ENGINE_RECOMPUTE,
    PATH_UNSUPPORTED_CACHE,
    Engine,
    Event,
    Finished,
    NewToken,
)

__all__ = [
    "Engine",
    "Event",
    "Finished",
    "NewToken",
    "PATH_BEAM_SEARCH",
    "PATH_ENGINE",
    "PATH_ENGINE_RECOMPUTE",
    "PATH_UNSUPPORTED_CACHE",
]
