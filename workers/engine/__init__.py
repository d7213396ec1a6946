"""shardgen's engine: continuous batching over a slot KV cache, chunked prefill, its own llama-family step.

    engine.py         the Engine (a Generator) and its loop
    scheduler.py      admission, prefill planning, retiring: which sample is in which cache row
    model_runner.py   the forward paths: the engine's own step, compiled, or the model's forward
    cache_sizing.py   slots per call and the KV cache that holds them (batch size auto)
    prefix_cache.py   shared prompt blocks prefilled once, kept across calls
    weight_formats.py the linear layers' format on this CPU: float32, bfloat16, int8
    llama_step.py, step_plan.py, kv_cache.py, slot_attention.py, packed_linear.py   what a step is made of
    sampling.py, stop.py    choosing tokens; stop strings
"""

from .cache_sizing import AUTO
from .engine import PATH_BEAM_SEARCH, PATH_ENGINE, PATH_UNSUPPORTED_CACHE, Engine
from .scheduler import Event, Finished, NewToken
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
    "PATH_UNSUPPORTED_CACHE",
]
