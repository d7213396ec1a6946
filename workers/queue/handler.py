"""What a worker does with a take-shard message: claim, generate, record; and what it does on a timer.

Plain functions over a WorkerContext, so the whole path runs in process in tests (fakeredis, a tiny model);
the Celery task only unpacks its argument and calls `handle_message`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from shardgen.schemas.errors import ShardgenError
from shardgen.schemas.layout import RunLayout
from shardgen.schemas.rows import shard_from_table
from shardgen.schemas.run import RunSpec
from shardgen.schemas.shard import TakeShard

from ..generation import GenerationCancelled, Generator
from ..lifecycle.dispatch import wake_workers
from ..lifecycle.store import LEASE_MS, Claim, RunStore, WorkerInfo
from ..models.loader import LoadedModel
from ..shard_processing import ShardOutcome, process_shard
from ..storage import files
from ..storage.run_files import new_attempt_token, publish_result, read_staged_shard
from . import logs
from .heartbeat import Heartbeat

log = logging.getLogger("shardgen.worker")


class Shutdown:
    """A requested shutdown: no new shard is taken, and the running one stops `grace_s` seconds later."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.deadline: float | None = None

    @property
    def requested(self) -> bool:
        return self.deadline is not None

    def request(self) -> None:
        if self.deadline is None:
            self.deadline = time.monotonic() + self.grace_s


@dataclass
class WorkerContext:
    loaded: LoadedModel
    generator: Generator
    store: RunStore
    wakeups: Any
    queue: str
    device: str
    worker_id: str
    lease_ms: int = LEASE_MS
    shutdown: Shutdown = field(default_factory=lambda: Shutdown(30.0))
    metrics: Any = None
    """A WorkerMetrics (queue/metrics.py) or None."""
    metrics_port: int | None = None
    started_at: float = field(default_factory=time.time)
    current: Claim | None = None
    _runs: dict[str, tuple[RunSpec, RunLayout]] = field(default_factory=dict)

    def run(self, run_id: str) -> tuple[RunSpec, RunLayout]:
        """A run's spec and file layout, read from the store once per run."""
        if run_id not in self._runs:
            spec = self.store.spec(run_id)
            work_dir = self.store.record(run_id, details=False).work_dir
            self._runs[run_id] = (spec, RunLayout(work_dir, run_id, spec.shard_size))
        return self._runs[run_id]

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            worker=self.worker_id, queue=self.queue, device=self.device, host=socket.gethostname(), pid=os.getpid(),
            started_at=self.started_at, last_seen=self.store.clock(),
            run_id=self.current.run_id if self.current else None,
            shard_index=self.current.shard_index if self.current else None, metrics_port=self.metrics_port,
        )


def worker_id(device: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{device}"


def handle_message(payload: Any, ctx: WorkerContext) -> str:
    """Take the next shard of this worker's queue and run it; returns what happened. Never raises for bad input."""
    try:
        message = TakeShard.from_dict(payload)
    except ShardgenError as exc:
        log.error("rejected message (not executed): %s", exc.line())
        return "rejected"
    if message.queue != ctx.queue:
        log.error("rejected message (not executed): it wakes queue %s, and this worker serves %s", message.queue, ctx.queue)
        return "rejected"
    if ctx.shutdown.requested:
        return "draining"
    claim = ctx.store.claim_next(ctx.queue, ctx.worker_id, ctx.lease_ms)
    if claim is None:
        return "idle"
    wake_workers(ctx.store, ctx.wakeups, ctx.queue)  # more shards waiting: wake more workers
    ctx.current = claim
    logs.current_shard = (claim.run_id, claim.shard_index)
    if ctx.metrics is not None:
        ctx.metrics.shard_started(claim)
    try:
        return run_claim(claim, ctx)
    finally:
        ctx.current = None
        logs.current_shard = None


def run_claim(claim: Claim, ctx: WorkerContext) -> str:
    """Generate one claimed shard into its own attempt object, then let the run store decide if it is the result."""
    where = f"shard {claim.shard_index} of run {claim.run_id}"
    heartbeat = Heartbeat(ctx.store, claim, lease_ms=ctx.lease_ms, shutdown_deadline=lambda: ctx.shutdown.deadline)
    heartbeat.start()
    stats_before = _engine_stats(ctx)
    try:
        spec, layout = ctx.run(claim.run_id)
        location = layout.attempt_part(claim.shard_index, new_attempt_token(claim.attempt))
        shard = shard_from_table(spec, claim.shard_index, read_staged_shard(layout, claim.shard_index))
        outcome = process_shard(
            shard, spec, ctx.loaded, ctx.generator, location, attempt=claim.attempt, worker=ctx.worker_id,
            on_row=heartbeat.row_done, should_stop=heartbeat.should_stop,
        )
    except GenerationCancelled:
        heartbeat.stop()
        return _ended(ctx, claim, _stopped(claim, ctx, heartbeat.stop_reason or "cancelled", where))
    except Exception as exc:  # noqa: BLE001 - any failure of a shard is recorded and retried, never lost
        heartbeat.stop()
        error = exc.line() if isinstance(exc, ShardgenError) else f"{type(exc).__name__}: {exc}"
        outcome_name, delay = ctx.store.fail(claim, error)
        if outcome_name == "retry":
            log.warning("%s failed (attempt %d), retrying in %.0fs: %s", where, claim.attempt, delay, error)
        else:
            log.error("%s failed (attempt %d, %s): %s", where, claim.attempt, outcome_name, error)
        return _ended(ctx, claim, outcome_name)
    heartbeat.stop()
    recorded = _record(claim, ctx, layout, outcome, where)
    stats = _engine_stats(ctx)
    occupancy = stats.since(stats_before).batch_occupancy if stats is not None and stats_before is not None else None
    return _ended(ctx, claim, recorded, outcome if recorded == "done" else None, occupancy)


def _record(claim: Claim, ctx: WorkerContext, layout: RunLayout, outcome: ShardOutcome, where: str) -> str:
    won = ctx.store.complete(
        claim, outcome.location, rows=outcome.rows, rows_failed=outcome.rows_failed,
        prompt_tokens=outcome.prompt_tokens, generated_tokens=outcome.generated_tokens,
        seconds=outcome.seconds, batch_halvings=outcome.batch_halvings,
    )
    if not won:
        log.warning("%s already has a result from another attempt; this attempt's copy is discarded", where)
        files.remove(outcome.location)
        return "duplicate"
    try:
        publish_result(layout, claim.shard_index, outcome.location)
    except ShardgenError as exc:  # the result stays where the run store recorded it; collect finds it there
        log.warning("%s: result recorded at %s but not published under its part name: %s", where, outcome.location, exc.line())
    log.info("%s done: %d rows, %d tokens, %.1fs", where, outcome.rows, outcome.generated_tokens, outcome.seconds)
    return "done"


def _stopped(claim: Claim, ctx: WorkerContext, reason: str, where: str) -> str:
    if reason == "lost":
        log.info("%s stopped: another attempt took it over", where)
        return "lost"
    outcome = ctx.store.release(claim, "shutdown" if reason == "shutdown" else "cancelled")
    if outcome == "requeued":
        wake_workers(ctx.store, ctx.wakeups, ctx.queue)
        log.warning("%s given back to its queue: this worker is shutting down", where)
        return "released"
    log.info("%s stopped: the run was cancelled", where)
    return outcome


def _ended(ctx: WorkerContext, claim: Claim, outcome: str, result: ShardOutcome | None = None,
           occupancy: float | None = None) -> str:
    if ctx.metrics is not None:
        ctx.metrics.shard_ended(claim, outcome, result, occupancy)
    return outcome


def _engine_stats(ctx: WorkerContext) -> Any:
    stats = getattr(ctx.generator, "stats", None)
    return stats.copy() if stats is not None else None


def watchdog_tick(ctx: WorkerContext) -> None:
    """Reap shards of dead workers, wake workers for what waits (retries whose backoff is over, wake-ups lost
    with dying workers), and report this worker live."""
    for run_id, index, outcome in ctx.store.reap_expired_leases():
        log.warning("shard %s of run %s lost its worker: %s", index, run_id, outcome)
    if not ctx.shutdown.requested:
        wake_workers(ctx.store, ctx.wakeups, ctx.queue)
    ctx.store.heartbeat_worker(ctx.info())
