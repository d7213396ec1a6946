"""The life of a run and its shards, and its one owner: states, the Redis key layout, every transition,
retries and backoff, reaping, and which shards still need work. The producer and the workers ask it; only
its scripts move a run's state. It knows nothing of how workers are woken (workers/queue/doorbell.py).
"""

from .policy import check_resumable
from .progress import current_status, run_status
from .resume import missing_results, present_results, redo_run, unfinished_shards
from .store import Claim, RunRecord, RunStore, ShardRecord, WorkerInfo

__all__ = [
    "Claim",
    "RunRecord",
    "RunStore",
    "ShardRecord",
    "WorkerInfo",
    "check_resumable",
    "current_status",
    "missing_results",
    "present_results",
    "redo_run",
    "run_status",
    "unfinished_shards",
]
