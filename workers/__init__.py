"""shardgen workers: model loading, generation, and the in-process Python API (`LLM`, imported on first use)."""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from .api import LLM

        return LLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
