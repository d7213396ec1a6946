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


class Outcome(str, Enum):
    """How one take-shard message ended for a worker: the value the lifecycle's scripts return, the handler
    returns, the logs print and the `shardgen_shards{outcome}` metric counts. One name per fact, from Lua to
    Prometheus."""

    DONE = "done"
    """This attempt's result was recorded as the shard's result."""
    DUPLICATE = "duplicate"
    """Another attempt's result was recorded first; this attempt's copy is discarded."""
    RETRY = "retry"
    """The attempt failed; the shard waits out its backoff and goes back to its queue."""
    FAILED = "failed"
    """The attempt failed and the shard is out of retries: it ended failed."""
    RELEASED = "released"
    """The worker is shutting down: the shard went back to the front of its queue, no retry counted."""
    LOST = "lost"
    """Another attempt took the shard over (this worker's lease had gone): this attempt stopped."""
    CANCELLED = "cancelled"
    """The run was cancelled while the shard ran."""
    STALE = "stale"
    """The worker no longer held this attempt when it reported (the shard was taken over or has ended)."""
    IDLE = "idle"
    """Nothing was waiting in the queue."""
    DRAINING = "draining"
    """The worker is shutting down and took nothing."""
    REJECTED = "rejected"
    """The message was malformed, foreign or meant for another queue; it was not executed."""


class Fault(str, Enum):
    """Whose fault a failed attempt was; it decides which budget the failure spends (lifecycle scripts/fail.lua).
    A row's own problem (too long, a template that refuses it, a value out of range) is none of these: it is
    that row's error, and the shard goes on."""

    SHARD = "shard"
    """The shard's own (its input cannot be read, a bug it triggers): retried after a backoff, up to max_retries."""
    WORKER = "worker"
    """The worker's (a CUDA error, an exception that hit every row, a stall): the shard goes straight back to its
    queue for another worker, spending no retry; the worker counts it towards stopping itself."""
    STORAGE = "storage"
    """The work directory's (a connection error, a timeout, a throttled request): retried with backoff for
    minutes (SHARDGEN_STORAGE_PATIENCE_SECONDS) before it spends a retry."""
