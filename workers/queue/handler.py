"""What a worker does with a take-shard message: claim -> run -> record; and what its watchdog does on a timer.

Plain functions over a WorkerContext, so the whole path runs in process in tests (fakeredis, a tiny model);
the Celery task only unpacks its argument and calls `handle_message`.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from shardgen.schemas.errors import ShardgenError
from shardgen.schemas.layout import RunLayout
from shardgen.schemas.model import ModelSpec, identity_difference
from shardgen.schemas.rows import shard_from_table
from shardgen.schemas.run import RunSpec
from shardgen.schemas.runtime import DEFAULT_GRACE_SECONDS, DEFAULT_SHARDS_IN_FLIGHT
from shardgen.schemas.shard import Shard, TakeShard
from shardgen.schemas.states import Fault, Outcome

from ..faults import describe, fault_of
from ..generation import GenerationCancelled, Generator
from ..lifecycle.store import LEASE_MS, Claim, RunStore, WorkerInfo
from ..models.loader import LoadedModel
from ..shard_processing import ShardOutcome, process_shard
from ..storage import files
from ..storage.run_files import new_attempt_token, publish_result, read_staged_shard
from . import logs
from .doorbell import Doorbell
from .health import Health
from .heartbeat import Heartbeat
from .in_flight import run_in_flight

log = logging.getLogger("shardgen.worker")


class Shutdown:
    """A requested shutdown: no new shard is taken, and the running one stops `grace_s` seconds later."""

    def __init__(self, grace_s: float = DEFAULT_GRACE_SECONDS):
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
    doorbell: Doorbell
    queue: str
    device: str
    worker_id: str
    lease_ms: int = LEASE_MS
    shutdown: Shutdown = field(default_factory=Shutdown)
    metrics: Any = None
    """A WorkerMetrics (queue/metrics.py) or None."""
    metrics_port: int | None = None
    serves: ModelSpec | None = None
    """The weights this worker loaded (checked against each claimed run's), or None: not checked."""
    started_at: float = field(default_factory=time.time)
    health: Health = field(default_factory=Health)
    current: Claim | None = None
    """The oldest shard this worker is running (status shows it)."""
    shards_in_flight: int = DEFAULT_SHARDS_IN_FLIGHT
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
            started_at=self.started_at, last_seen=self.store.now(),
            run_id=self.current.run_id if self.current else None,
            shard_index=self.current.shard_index if self.current else None, metrics_port=self.metrics_port,
            model=self.serves.identity if self.serves is not None else None,
        )


@dataclass
class Attempt:
    """What running a claimed shard gave: a result to record, a reason it stopped, or the error it raised."""

    result: ShardOutcome | None = None
    stopped: str | None = None
    """'lost', 'cancelled', 'shutdown' or 'stalled' (the heartbeat's stop reason)."""
    error: str | None = None
    fault: Fault = Fault.SHARD
    """Whose fault the error was (workers/faults.py)."""
    occupancy: float | None = None
    """The engine's batch occupancy over the shard."""


def worker_id(device: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{device}"


def handle_message(payload: Any, ctx: WorkerContext) -> Outcome:
    """Take the next shard of this worker's queue, run it, record what happened. Never raises for bad input."""
    refusal = _refusal(payload, ctx)
    if refusal is not None:
        log.error("rejected message (not executed): %s", refusal)
        return Outcome.REJECTED
    if ctx.shutdown.requested or ctx.health.stopped:
        return Outcome.DRAINING
    claim = ctx.store.claim_next(ctx.queue, ctx.worker_id, ctx.lease_ms)
    if claim is None:
        return Outcome.IDLE
    ctx.doorbell.ring(ctx.queue)  # more shards may be waiting: wake a peer for each
    if ctx.metrics is not None:
        ctx.metrics.shard_started(claim)
    try:
        if ctx.shards_in_flight > 1 and getattr(ctx.generator, "takes_refills", False):
            return run_in_flight(claim, ctx, open_shard=lambda c: open_shard(c, ctx),
                                 conclude=lambda c, attempt: conclude(c, ctx, attempt),
                                 attempt_of=functools.partial(attempt_of, ctx))
        return conclude(claim, ctx, run(claim, ctx))
    finally:
        ctx.current, logs.current_shard = None, None
        ctx.health.heartbeat = None


def conclude(claim: Claim, ctx: WorkerContext, attempt: Attempt) -> Outcome:
    """Record an attempt, count it, and stop this worker when its attempts keep failing by its own fault."""
    running, logs.current_shard = logs.current_shard, (claim.run_id, claim.shard_index)  # its lines name it
    try:
        outcome = record(claim, ctx, attempt)
    finally:
        logs.current_shard = running
    if ctx.metrics is not None:
        ctx.metrics.shard_ended(claim, outcome, attempt.result if outcome is Outcome.DONE else None, attempt.occupancy)
        if (stats := getattr(ctx.generator, "stats", None)) is not None:
            ctx.metrics.engine_totals(stats)
    if ctx.health.attempt_ended(attempt.fault if attempt.error else None, attempt.error):
        stop_worker(ctx, ctx.health.stopped)
    return outcome


def _refusal(payload: Any, ctx: WorkerContext) -> str | None:
    try:
        message = TakeShard.from_dict(payload)
    except ShardgenError as exc:
        return exc.line()
    if message.queue != ctx.queue:
        return f"it wakes queue {message.queue}, and this worker serves {ctx.queue}"
    return None


def run(claim: Claim, ctx: WorkerContext) -> Attempt:
    """Generate one claimed shard into its own attempt object, under a heartbeat that renews its lease."""
    opened = open_shard(claim, ctx)
    if isinstance(opened, Attempt):
        return opened
    spec, location, shard, heartbeat = opened
    stats_before = _engine_stats(ctx)
    try:
        result = process_shard(
            shard, spec, ctx.loaded, ctx.generator, location, attempt=claim.attempt, worker=ctx.worker_id,
            on_row=heartbeat.row_done, should_stop=heartbeat.should_stop,
        )
    except GenerationCancelled:
        return attempt_of(ctx, stopped=heartbeat.stop_reason or "cancelled")
    except Exception as exc:  # noqa: BLE001 - any failure of a shard is recorded and retried, never lost
        return attempt_of(ctx, error=exc)
    finally:
        heartbeat.stop()
    return attempt_of(ctx, result=result, stats_before=stats_before)


def open_shard(claim: Claim, ctx: WorkerContext) -> tuple[RunSpec, str, Shard, Heartbeat] | Attempt:
    """Start a claimed shard's heartbeat and read its rows: (spec, attempt location, shard, heartbeat), or the
    Attempt that ends it at once (other weights, unreadable input)."""
    heartbeat = Heartbeat(ctx.store, claim, lease_ms=ctx.lease_ms, shutdown_deadline=lambda: ctx.shutdown.deadline,
                          stall_s=ctx.health.stall_s, on_stall=lambda: give_up_stalled(claim, ctx))
    ctx.health.heartbeat = heartbeat
    ctx.current = ctx.current or claim
    logs.current_shard = (claim.run_id, claim.shard_index)
    heartbeat.start()
    try:
        spec, layout = ctx.run(claim.run_id)
        refusal = other_weights(spec.model, ctx)
        if refusal is not None:
            heartbeat.stop()
            return Attempt(error=refusal)
        location = layout.attempt_part(claim.shard_index, new_attempt_token(claim.attempt))
        shard = shard_from_table(spec, claim.shard_index, read_staged_shard(layout, claim.shard_index))
    except Exception as exc:  # noqa: BLE001
        heartbeat.stop()
        return attempt_of(ctx, error=exc)
    return spec, location, shard, heartbeat


def attempt_of(ctx: WorkerContext, *, result: ShardOutcome | None = None, stats_before: Any = None,
               error: BaseException | None = None, stopped: str | None = None) -> Attempt:
    if error is not None:
        return Attempt(error=describe(error), fault=fault_of(error))
    if stopped is not None:
        return Attempt(stopped=stopped)
    stats = _engine_stats(ctx)
    occupancy = stats.since(stats_before).batch_occupancy if stats is not None and stats_before is not None else None
    return Attempt(result=result, occupancy=occupancy)


def other_weights(wanted: ModelSpec, ctx: WorkerContext) -> str | None:
    """Why this worker must not serve a run that wants `wanted`, or None. Queues are named after the whole
    identity, so this only catches what a queue name cannot (a run recorded by an older shardgen, a digest
    collision): such a run is never served, and fails with the difference once its retries are spent."""
    if ctx.serves is None:
        return None
    difference = identity_difference(wanted.identity, ctx.serves.identity)
    if difference is None:
        return None
    log.error("refusing shard of a run for other weights: this worker serves %s", difference)
    return f"worker {ctx.worker_id} holds other weights ({difference}): start `shardgen worker {wanted.worker_flags()}`"


def record(claim: Claim, ctx: WorkerContext, attempt: Attempt) -> Outcome:
    """Tell the run store how the attempt ended; it decides what becomes of the shard."""
    where = f"shard {claim.shard_index} of run {claim.run_id}"
    if attempt.error is not None:
        outcome, delay = ctx.store.fail(claim, attempt.error, attempt.fault)
        if outcome is Outcome.RETRY:
            log.warning("%s failed (attempt %d, %s's fault), retrying in %.0fs: %s", where, claim.attempt,
                        attempt.fault.value, delay, attempt.error)
        else:
            log.error("%s failed (attempt %d, %s): %s", where, claim.attempt, outcome.value, attempt.error)
        return outcome
    if attempt.stopped == "lost":
        log.info("%s stopped: another attempt took it over", where)
        return Outcome.LOST
    if attempt.stopped == "stalled":  # give_up_stalled has already handed the shard back
        return Outcome.RETRY
    if attempt.stopped is not None:
        outcome = ctx.store.release(claim, "shutdown" if attempt.stopped == "shutdown" else "cancelled")
        if outcome is Outcome.RELEASED:
            ctx.doorbell.ring(ctx.queue)
            log.warning("%s given back to its queue: this worker is shutting down", where)
        else:
            log.info("%s stopped: the run was cancelled", where)
        return outcome
    result = attempt.result
    assert result is not None
    outcome = ctx.store.complete(
        claim, result.location, rows=result.rows, rows_failed=result.rows_failed, prompt_tokens=result.prompt_tokens,
        generated_tokens=result.generated_tokens, seconds=result.seconds, batch_halvings=result.batch_halvings,
    )
    if outcome is Outcome.DUPLICATE:
        log.warning("%s already has a result from another attempt; this attempt's copy is discarded", where)
        files.remove(result.location)
        return outcome
    try:
        publish_result(ctx.run(claim.run_id)[1], claim.shard_index, result.location)
    except ShardgenError as exc:  # the result stays where the run store recorded it; collect finds it there
        log.warning("%s: result recorded at %s but not published under its part name: %s", where, result.location, exc.line())
    log.info("%s done: %d rows, %d tokens, %.1fs", where, result.rows, result.generated_tokens, result.seconds)
    return outcome


def give_up_stalled(claim: Claim, ctx: WorkerContext) -> None:
    """The heartbeat saw no progress for stall_seconds (a hung kernel, a hung storage call): hand the shard to
    another worker as this worker's fault, and stop this worker; its process exits, to be restarted, since the
    thread that hangs may never come back."""
    reason = f"stalled: shard {claim.shard_index} of run {claim.run_id} made no progress for {ctx.health.stall_s:g}s"
    try:
        outcome, _ = ctx.store.fail(claim, reason, Fault.WORKER)
        log.error("%s; shard given up (%s)", reason, outcome.value)
    finally:
        ctx.health.stopped = reason
        stop_worker(ctx, reason)
        ctx.health.exit_stalled()


def stop_worker(ctx: WorkerContext, reason: str) -> None:
    """This worker takes no more shards: it says why where `status` shows it, and its process exits non-zero so the
    supervisor or the platform restarts it."""
    log.error("worker %s stops: %s", ctx.worker_id, reason)
    ctx.shutdown.request()
    ctx.store.worker_stopped(ctx.info(), reason)
    ctx.health.request_exit()


def _engine_stats(ctx: WorkerContext) -> Any:
    stats = getattr(ctx.generator, "stats", None)
    return stats.copy() if stats is not None else None


def watchdog_tick(ctx: WorkerContext) -> None:
    """Reap shards of dead workers, ring for what waits (retries whose backoff is over, wake-ups lost with dying
    workers), and report this worker live."""
    ctx.health.report_alive()
    for run_id, index, state in ctx.store.reap_expired_leases():
        log.warning("shard %s of run %s lost its worker: now %s", index, run_id, state.value)
    if ctx.health.stopped:
        return
    if not ctx.shutdown.requested:
        ctx.doorbell.ring(ctx.queue)
    ctx.store.heartbeat_worker(ctx.info())
