"""`shardgen status`: where a run stands, as a table or as JSON."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from rich.console import Group
from rich.table import Table

from shardgen.workers.lifecycle.store import RunRecord

from .display import human_duration, key_value_table, rows_table


def status_dict(record: RunRecord) -> dict[str, Any]:
    states = Counter(s.state for s in record.shards)
    in_flight_rows = sum(s.rows_done for s in record.shards if s.state == "running")
    rows_progress = record.rows_done + in_flight_rows
    end = record.finished_at or time.time()
    elapsed = end - record.started_at if record.started_at else 0.0
    rate_rows = rows_progress / elapsed if elapsed > 0 else 0.0
    remaining = record.rows_total - rows_progress
    eta = 0.0 if record.finished else (remaining / rate_rows if rate_rows > 0 else None)
    workers = sorted({s.worker for s in record.shards if s.state == "running" and s.worker})
    return {
        "run_id": record.run_id,
        "state": record.state,
        "model": record.spec.model.model,
        "quantize": record.spec.model.quantize,
        "queue": record.spec.model.queue,
        "work_dir": record.work_dir,
        "rows_total": record.rows_total,
        "rows_done": record.rows_done,
        "rows_in_progress": in_flight_rows,
        "rows_failed": record.rows_failed,
        "shards_total": record.shards_total,
        "shards_queued": states.get("queued", 0),
        "shards_running": states.get("running", 0),
        "shards_done": record.shards_done,
        "shards_failed": record.shards_failed,
        "prompt_tokens": record.prompt_tokens,
        "generated_tokens": record.generated_tokens,
        "tokens_per_second": round(record.generated_tokens / elapsed, 2) if elapsed > 0 else 0.0,
        "elapsed_s": round(elapsed, 2),
        "eta_s": None if eta is None else round(eta, 1),
        "retries": sum(s.retries for s in record.shards),
        "reassigned": sum(s.reassigned for s in record.shards),
        "batch_halvings": sum(s.halvings for s in record.shards),
        "workers": workers,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "failed_shards": [
            {"shard": s.index, "attempts": s.attempts, "error": s.error} for s in record.shards if s.state == "failed"
        ],
    }


def status_view(status: dict[str, Any]) -> Group:
    overview = key_value_table(
        f"run {status['run_id']}",
        [
            ("state", status["state"]),
            ("model", f"{status['model']} ({status['quantize']})"),
            ("rows", f"{status['rows_done'] + status['rows_in_progress']:,} of {status['rows_total']:,} ({status['rows_failed']:,} failed)"),
            (
                "shards",
                f"{status['shards_queued']} queued, {status['shards_running']} running, "
                f"{status['shards_done']} done, {status['shards_failed']} failed of {status['shards_total']}",
            ),
            ("tokens", f"{status['generated_tokens']:,} generated, {status['prompt_tokens']:,} prompt"),
            ("tokens/s", f"{status['tokens_per_second']:,.1f}"),
            ("elapsed", human_duration(status["elapsed_s"])),
            ("ETA", human_duration(status["eta_s"])),
            ("retries / reassigned / batch halvings", f"{status['retries']} / {status['reassigned']} / {status['batch_halvings']}"),
            ("workers", ", ".join(status["workers"]) or "-"),
        ],
    )
    parts: list[Any] = [overview]
    if status["failed_shards"]:
        parts.append(
            rows_table("failed shards", ["shard", "attempts", "error"], [(f["shard"], f["attempts"], f["error"]) for f in status["failed_shards"]])
        )
    return Group(*parts)


def runs_table(records: list[RunRecord]) -> Table:
    return rows_table(
        "runs",
        ["run id", "state", "model", "rows done", "rows total", "shards"],
        [(r.run_id, r.state, r.spec.model.model, r.rows_done, r.rows_total, r.shards_total) for r in records],
    )
