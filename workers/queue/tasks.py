"""The Celery task: unpack the message and hand it to handle_message. Nothing else."""

from __future__ import annotations

from typing import Any

from .celery_app import TASK_NAME, app
from .handler import WorkerContext, handle_message

CONTEXT: WorkerContext | None = None
"""Set once by worker_main, in the worker process, after the model is loaded."""


@app.task(name=TASK_NAME, ignore_result=True)
def take_shard(payload: Any) -> str:
    if CONTEXT is None:
        raise RuntimeError("worker context not set: start workers with `shardgen worker`")
    return handle_message(payload, CONTEXT)
