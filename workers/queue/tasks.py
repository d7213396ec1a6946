"""The Celery task: unpack a shard message, call process_shard, report to the run store. Nothing else."""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shardgen.schemas.errors import ShardgenError
from shardgen.schemas.run import RunSpec
from shardgen.schemas.shard import ShardMessage

from .celery_app import TASK_NAME, app, enqueue
from ..generation import GenerationCancelled, Generator
from ..models.loader import LoadedModel
from ..process_shard import process_shard
from ..lifecycle.store import LEASE_MS, RunStore

log = logging.getLogger("shardgen.worker")


@dataclass
class WorkerContext:
    loaded: LoadedModel
    generator: Generator
    store: RunStore
    worker_id: str
    batch_size: int


CONTEXT: WorkerContext | None = None


def worker_id(device: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{device}"


@app.task(name=TASK_NAME, ignore_result=True)
def process_shard_task(payload: Any) -> None:
    assert CONTEXT is not None, "worker context not set: start workers with `shardgen worker`"
    handle_message(payload, CONTEXT)


def handle_message(payload: Any, ctx: WorkerContext) -> str:
    """Run one shard message; returns what happened (for logs and tests). Never raises for bad input."""
    try:
        message = ShardMessage.from_dict(payload)
        spec = ctx.store.spec(message.run_id)
    except ShardgenError as exc:
        log.error("rejected message (not executed): %s", exc.line())
        return "rejected"
    if spec.model.slug != ctx.loaded.spec.slug:
        log.error("run %s needs model %s but this worker serves %s; sent back to %s", spec.run_id, spec.model.slug, ctx.loaded.spec.slug, spec.model.queue)
        enqueue(app, payload, spec.model.queue)
        return "rerouted"
    claim = ctx.store.claim(message.run_id, message.shard_index, ctx.worker_id, message.attempt)
    if claim != "claimed":
        log.info("shard %s of run %s skipped: %s", message.shard_index, message.run_id, claim)
        return claim
    heartbeat = Heartbeat(ctx.store, message.run_id, message.shard_index, ctx.worker_id)
    heartbeat.start()
    try:
        run_dir = Path(ctx.store.record(message.run_id, with_shards=False).work_dir) / message.run_id
        outcome = process_shard(
            message.shard(),
            spec,
            ctx.loaded,
            ctx.generator,
            run_dir,
            attempt=message.attempt,
            worker=ctx.worker_id,
            on_row=lambda _output: heartbeat.row_done(),
            should_stop=heartbeat.cancelled.is_set,
        )
    except GenerationCancelled:
        heartbeat.stop()
        ctx.store.release_cancelled(message.run_id, message.shard_index, ctx.worker_id)
        log.info("shard %s of run %s stopped: the run was cancelled", message.shard_index, message.run_id)
        return "cancelled"
    except Exception as exc:  # noqa: BLE001 - any failure of a shard is recorded and retried, never lost
        heartbeat.stop()
        return _record_failure(ctx, spec, message, payload, exc)
    finally:
        ctx.generator.batch_size = ctx.batch_size  # a halving after OOM lasts for its shard only
    heartbeat.stop()
    ctx.store.complete(
        message.run_id,
        message.shard_index,
        ctx.worker_id,
        rows=outcome.rows,
        rows_failed=outcome.rows_failed,
        prompt_tokens=outcome.prompt_tokens,
        generated_tokens=outcome.generated_tokens,
        seconds=outcome.seconds,
        batch_halvings=outcome.batch_halvings,
    )
    log.info("shard %s of run %s done: %d rows, %d tokens, %.1fs", message.shard_index, message.run_id, outcome.rows, outcome.generated_tokens, outcome.seconds)
    return "done"


def _record_failure(ctx: WorkerContext, spec: RunSpec, message: ShardMessage, payload: dict, exc: Exception) -> str:
    error = f"{type(exc).__name__}: {exc}"
    final = message.attempt > spec.max_retries
    ctx.store.fail(message.run_id, message.shard_index, ctx.worker_id, error, final=final)
    if final:
        log.error("shard %s of run %s failed after %d attempts: %s", message.shard_index, message.run_id, message.attempt, error)
        return "failed"
    delay = min(2.0 ** message.attempt, 60.0)
    log.warning("shard %s of run %s failed (attempt %d), retrying in %.0fs: %s", message.shard_index, message.run_id, message.attempt, delay, error)
    enqueue(app, {**payload, "attempt": message.attempt + 1}, spec.model.queue, countdown=delay)
    return "retrying"


def requeue_expired_shards(store: RunStore) -> int:
    """Send shards whose worker died back to the queue (each exactly once, whoever calls this)."""
    requeued = 0
    for run_id, index, attempts, reassigned in store.reap_expired_leases():
        try:
            spec = store.spec(run_id)
            rows = store.shard_rows(run_id, index)
        except ShardgenError as exc:
            log.error("cannot requeue shard %s of run %s: %s", index, run_id, exc.line())
            continue
        if reassigned > spec.max_retries + 1:
            store.fail(run_id, index, "reaper", f"its worker died {reassigned} times while running it", final=True)
            log.error("shard %s of run %s failed: its worker died %d times", index, run_id, reassigned)
            continue
        message = ShardMessage(run_id, index, rows, attempt=attempts + 1)
        enqueue(app, message.to_dict(), spec.model.queue)
        log.warning("shard %s of run %s lost its worker; requeued (attempt %d)", index, run_id, attempts + 1)
        requeued += 1
    return requeued


class Watchdog:
    """A worker-side thread that periodically puts back the shards of workers that died."""

    def __init__(self, store: RunStore, interval_s: float = min(10.0, LEASE_MS / 3000)):
        self.store, self.interval_s = store, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="shardgen-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while True:
            try:
                requeue_expired_shards(self.store)
            except Exception as exc:  # noqa: BLE001 - Redis may be restarting; try again next round
                log.warning("watchdog: %s", exc)
            if self._stop.wait(self.interval_s):
                return


class Heartbeat:
    """Renews the shard's lease while it runs, publishes how many of its rows are done, notices cancellation."""

    def __init__(self, store: RunStore, run_id: str, shard_index: int, worker: str, interval_s: float = min(2.0, LEASE_MS / 5000)):
        self.store, self.run_id, self.shard_index, self.worker = store, run_id, shard_index, worker
        self.interval_s = interval_s
        self.rows_done = 0
        self.cancelled = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="shardgen-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def row_done(self) -> None:
        self.rows_done += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.store.renew(self.run_id, self.shard_index, self.worker, self.rows_done):
                    # Another worker took the shard over; ours still finishes, and the first complete file wins.
                    log.warning("shard %s of run %s: lease lost to another worker", self.shard_index, self.run_id)
                if self.store.is_cancelled(self.run_id):
                    self.cancelled.set()
            except Exception as exc:  # noqa: BLE001 - Redis blips must not kill the shard
                log.warning("lease renewal failed: %s", exc)
