"""shardgen workers: what runs next to a GPU. Its public surface, imported on first use (torch is heavy):

    LLM                 the in-process Python API (workers/api.py)
    load_model          resolve and load a model once (workers/models)
    load_generator      load a model and build the generator `--engine` asks for (every driver calls it)
    make_generator      shardgen's engine (or transformers' generate) for a model already loaded
    process_shard       one shard in, one Parquet object out; both drivers call it
    start_worker        a Celery worker serving one model on one device, from a WorkerConfig (workers/queue)
    supervise           one worker process per device of this node (`--devices`), restarted when they crash
    parse_devices       what `--devices` names: all, 0,1,3 or cpu,cpu

Subpackages with their own public surface: `lifecycle` (run state), `storage` (files and datasets).
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "LLM": ".api",
    "load_model": ".models.loader",
    "check_device": ".models.loader",
    "resolve_model": ".models.loader",
    "BROKER_ENV": ".redis_conn",
    "DEFAULT_BROKER_URL": ".redis_conn",
    "SENTINEL_MASTER_ENV": ".redis_conn",
    "make_generator": ".generators",
    "load_generator": ".generators",
    "WorkerConfig": ".queue.config",
    "process_shard": ".shard_processing",
    "start_worker": ".queue.worker_main",
    "supervise": ".queue.supervisor",
    "parse_devices": ".queue.devices",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
