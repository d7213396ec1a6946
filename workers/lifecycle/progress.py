"""Where a run stands, as `status` shows it: rows (including those of running shards), rate and ETA."""

from __future__ import annotations

from typing import Any

from shardgen.schemas.model import identity_difference

from .store import RunRecord, RunStore, WorkerInfo


def current_status(store: RunStore, run_id: str) -> dict[str, Any]:
    """What `status RUN_ID` shows: the run, its queue, the live workers of its queue, and those that stopped."""
    record = store.record(run_id)
    return run_status(record, store.now(), queue_depth=store.queue_depth(record.queue), workers=store.workers(),
                      stopped=store.stopped_workers())


def run_status(record: RunRecord, now: float, *, queue_depth: dict[str, int] | None = None,
               workers: list[WorkerInfo] | None = None, stopped: list[WorkerInfo] | None = None) -> dict[str, Any]:
    """A JSON-ready summary of a run; `queue_depth`, `workers` and `stopped` add the queue, the live workers and
    the workers of its queue that stopped themselves (and why)."""
    in_flight_rows = sum(s.rows_done for s in record.running)
    rows_progress = record.rows_done + in_flight_rows
    end = record.finished_at or now
    elapsed = end - record.started_at if record.started_at else 0.0
    rate_rows = rows_progress / elapsed if elapsed > 0 else 0.0
    remaining = record.rows_total - rows_progress
    eta = 0.0 if record.finished else (remaining / rate_rows if rate_rows > 0 else None)
    status: dict[str, Any] = {
        "run_id": record.run_id,
        "state": record.state.value,
        "model": record.spec.model.model,
        "quantize": record.spec.model.quantize,
        "queue": record.queue,
        "work_dir": record.work_dir,
        "rows_total": record.rows_total,
        "rows_done": record.rows_done,
        "rows_in_progress": in_flight_rows,
        "rows_failed": record.rows_failed,
        "shards_total": record.shards_total,
        **{f"shards_{state}": count for state, count in record.shards.items()},
        "prompt_tokens": record.prompt_tokens,
        "generated_tokens": record.generated_tokens,
        "tokens_per_second": round(record.generated_tokens / elapsed, 2) if elapsed > 0 else 0.0,
        "elapsed_s": round(elapsed, 2),
        "eta_s": None if eta is None else round(eta, 1),
        "retries": record.retries,
        "reassigned": record.reassigned,
        "batch_halvings": record.halvings,
        "worker_faults": record.worker_faults,
        "storage_errors": record.storage_errors,
        "leases_taken_back": record.reacquired,
        "running_shards": [
            {"shard": s.index, "worker": s.worker, "rows_done": s.rows_done, "attempt": s.attempt} for s in record.running
        ],
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "failed_shards": [{"shard": s.index, "attempts": s.attempt, "error": s.error} for s in record.failed],
    }
    if queue_depth is not None:
        status["queue_depth"] = queue_depth
    if workers is not None:
        status["workers"] = [
            {**info.__dict__, "last_heartbeat_s_ago": round(now - info.last_seen, 1)}
            for info in workers if info.queue == record.queue
        ]
    if workers is not None:
        wanted = record.spec.model
        status["serve_with"] = f"shardgen worker {wanted.worker_flags()}"
        status["other_workers"] = [
            {"worker": info.worker, "queue": info.queue,
             "differs": identity_difference(wanted.identity, info.model) if info.model else "unknown weights"}
            for info in workers if info.queue != record.queue and (info.model or {}).get("model") == wanted.model
        ]
    if stopped is not None:
        status["stopped_workers"] = [
            {"worker": info.worker, "host": info.host, "device": info.device, "reason": info.stopped,
             "stopped_s_ago": round(now - info.last_seen, 1)}
            for info in stopped if info.queue == record.queue
        ]
    return status
