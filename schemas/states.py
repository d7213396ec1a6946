"""The states a run and its shards move through. Only the lifecycle (workers/lifecycle) moves them."""

from __future__ import annotations

from enum import Enum


class RunState(str, Enum):
    QUEUED = "queued"
    """Submitted; no shard has started yet."""
    RUNNING = "running"
    DONE = "done"
    """Every shard has its result."""
    FAILED = "failed"
    """Every shard has ended, and at least one failed for good."""
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (RunState.DONE, RunState.FAILED, RunState.CANCELLED)


class ShardState(str, Enum):
    QUEUED = "queued"
    """Waiting in its queue (or for its retry backoff to pass)."""
    RUNNING = "running"
    """Claimed by a worker that holds its lease."""
    DONE = "done"
    """One attempt's result is recorded as the shard's result."""
    FAILED = "failed"
    """Failed more often than the run's max_retries allow."""
    CANCELLED = "cancelled"
