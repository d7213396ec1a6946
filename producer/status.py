"""`shardgen status`: a run's status (computed by the lifecycle) shown as tables. Run ids never wrap, so they
can be copied from any terminal width."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table

from shardgen.workers.lifecycle import RunRecord

from .display import human_duration, key_value_table, rows_table


def status_view(status: dict[str, Any]) -> Group:
    overview = key_value_table(
        "run",
        [
            ("run id", status["run_id"]),
            ("state", status["state"]),
            ("model", f"{status['model']} ({status['quantize']})"),
            ("rows", f"{status['rows_done'] + status['rows_in_progress']:,} of {status['rows_total']:,} ({status['rows_failed']:,} failed)"),
            (
                "shards",
                f"{status['shards_queued']} queued, {status['shards_running']} running, {status['shards_done']} done, "
                f"{status['shards_failed']} failed, {status['shards_cancelled']} cancelled of {status['shards_total']}",
            ),
            ("tokens", f"{status['generated_tokens']:,} generated, {status['prompt_tokens']:,} prompt"),
            ("tokens/s", f"{status['tokens_per_second']:,.1f}"),
            ("elapsed", human_duration(status["elapsed_s"])),
            ("ETA", human_duration(status["eta_s"])),
            ("retries/reassigned/halvings", f"{status['retries']} / {status['reassigned']} / {status['batch_halvings']}"),
            ("worker faults/storage errors", f"{status['worker_faults']} / {status['storage_errors']}"),
            ("queue", f"{status['queue']}" + (f" ({status['queue_depth']['waiting']:,} waiting, {status['queue_depth']['backoff']:,} in backoff)" if "queue_depth" in status else "")),
        ],
    )
    parts: list[Any] = [overview]
    if status.get("workers"):
        parts.append(rows_table(
            "live workers", ["worker", "device", "shard", "last heartbeat"],
            [(w["worker"], w["device"], "-" if w["shard_index"] is None else f"{w['shard_index']} of {w['run_id']}",
              f"{w['last_heartbeat_s_ago']:.0f}s ago") for w in status["workers"]],
            no_wrap=("worker", "shard"),
        ))
    if "workers" in status and not status["workers"] and status["state"] in ("queued", "running"):
        parts.append(f"no live worker serves this run: start one with `{status['serve_with']}`")
    if status.get("other_workers"):
        parts.append(rows_table(
            "live workers of this model with other weights (they never take this run)", ["worker", "differs"],
            [(w["worker"], w["differs"]) for w in status["other_workers"]], no_wrap=("worker",),
        ))
    if status.get("stopped_workers"):
        parts.append(rows_table(
            "workers that stopped themselves", ["worker", "when", "why"],
            [(w["worker"], f"{human_duration(w['stopped_s_ago'])} ago", w["reason"]) for w in status["stopped_workers"]],
            no_wrap=("worker",),
        ))
    if status["failed_shards"]:
        parts.append(
            rows_table("failed shards", ["shard", "attempts", "error"], [(f["shard"], f["attempts"], f["error"]) for f in status["failed_shards"]])
        )
    return Group(*parts)


def runs_table(records: list[RunRecord]) -> Table:
    return rows_table(
        "runs",
        ["run id", "state", "model", "rows done", "rows total", "shards"],
        [(r.run_id, r.state.value, r.spec.model.model, r.rows_done, r.rows_total, r.shards_total) for r in records],
        no_wrap=("run id",),
    )
