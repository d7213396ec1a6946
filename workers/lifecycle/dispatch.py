"""Keep workers awake while shards wait: top up the wake-ups of a queue (see queue/celery_app.py)."""

from __future__ import annotations

from typing import Any, Protocol

from .store import RunStore

WAKE_WINDOW = 32
"""Wake-ups kept in flight per queue: enough to start every idle worker quickly, few enough to cost nothing."""


class Wakeups(Protocol):
    def in_flight(self, queue: str) -> int:
        """Wake-ups sent for `queue` that no worker has received yet."""

    def send(self, queue: str, count: int) -> None:
        ...


class CeleryWakeups:
    """Wake-ups as Celery `shardgen.take_shard` messages on the queue's wake queue (sg.q.X -> sg.take.X)."""

    def __init__(self, app: Any, redis: Any):
        self.app, self.redis = app, redis

    def in_flight(self, queue: str) -> int:
        from ..queue.celery_app import wake_queue

        return int(self.redis.llen(wake_queue(queue)))

    def send(self, queue: str, count: int) -> None:
        from ..queue.celery_app import send_wakeups

        send_wakeups(self.app, queue, count)


def wake_workers(store: RunStore, wakeups: Wakeups, queue: str) -> int:
    """Send wake-ups until min(shards takeable now, window) are in flight; returns how many were sent.

    Called after a submit, a retry or a resume, by a worker whenever it claims or gives back a shard, and by
    every worker's watchdog on a timer (so a shard coming out of its backoff, or a wake-up lost with a dying
    worker, is always followed by one). Several callers may top up at once; the surplus finds nothing to take.
    """
    wanted = min(store.due_count(queue), WAKE_WINDOW) - wakeups.in_flight(queue)
    if wanted > 0:
        wakeups.send(queue, wanted)
    return max(wanted, 0)
