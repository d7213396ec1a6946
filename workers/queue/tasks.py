"""The Celery task: unpack the message and hand it to handle_message. Nothing else."""

from __future__ import annotations

from typing import Any

from .celery_app import TASK_NAME
from .handler import WorkerContext, handle_message


def register(app: Any, ctx: WorkerContext) -> None:
    """Register `shardgen.take_shard` on this worker's app, bound to its context (model loaded, store open)."""

    @app.task(name=TASK_NAME, ignore_result=True)
    def take_shard(payload: Any) -> str:
        return handle_message(payload, ctx).value
