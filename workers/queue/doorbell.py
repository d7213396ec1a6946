"""The doorbell: the one way shardgen wakes workers for shards waiting in a queue.

Shards wait in the run store's queue (`sg.q.<model>`). Whoever makes a shard takeable rings: `submit`, `retry`
and a resume after queueing shards, a worker after it claims one (there may be more for its peers) or gives one
back, and every worker's watchdog on a timer (a retry whose backoff is over, a wake-up lost with a dying worker).
A ring tops the queue's wake-ups up to min(shards takeable now, WAKE_WINDOW): several ringing at once only send a
few wake-ups that find nothing to take.
"""

from __future__ import annotations

from typing import Any, Protocol

from shardgen.schemas.shard import TakeShard

from ..lifecycle.store import RunStore
from .celery_app import TASK_NAME, make_app, wake_queue

WAKE_WINDOW = 32
"""Wake-ups kept in flight per queue: enough to start every idle worker quickly, few enough to cost nothing."""


class Bell(Protocol):
    """Where wake-ups go: Celery in production, a counter in tests."""

    def waiting(self, queue: str) -> int:
        """Wake-ups sent for `queue` that no worker has received yet."""

    def send(self, queue: str, count: int) -> None:
        ...


class CeleryBell:
    """Wake-ups as `shardgen.take_shard` messages on the queue's Celery queue (sg.q.X -> sg.take.X)."""

    def __init__(self, app: Any, redis: Any):
        self.app, self.redis = app, redis

    def waiting(self, queue: str) -> int:
        return int(self.redis.llen(wake_queue(queue)))

    def send(self, queue: str, count: int) -> None:
        message = TakeShard(queue).to_dict()
        with self.app.producer_or_acquire() as producer:
            for _ in range(count):
                self.app.send_task(TASK_NAME, args=[message], queue=wake_queue(queue), serializer="json",
                                   producer=producer)


class Doorbell:
    def __init__(self, store: RunStore, bell: Bell):
        self.store, self.bell = store, bell

    @classmethod
    def of(cls, store: RunStore, app: Any = None) -> "Doorbell":
        """The Celery doorbell of the broker `store` talks to (its own Celery app unless one is given)."""
        assert store.url is not None, "a store built on a bare client has no broker URL to ring through"
        return cls(store, CeleryBell(app if app is not None else make_app(store.url), store.redis))

    def ring(self, queue: str) -> int:
        """Send wake-ups until min(shards takeable now, WAKE_WINDOW) are in flight; returns how many were sent."""
        wanted = min(self.store.due_count(queue), WAKE_WINDOW) - self.bell.waiting(queue)
        if wanted > 0:
            self.bell.send(queue, wanted)
        return max(wanted, 0)
