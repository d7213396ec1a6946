"""`shardgen submit`: stage the input once in the work directory, record the run, ring the doorbell.

The dataset is read and checked before anything is written, so bad input leaves no trace. The input is then
written once, as Parquet, to WORK_DIR/RUN_ID/input/ (workers read their shard from there, retries and resumes
too), run.json beside it, and the run is recorded in Redis with one entry per shard in its model's queue:
metadata whose size grows with the number of shards, not with the rows' text.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console

from shardgen.schemas.layout import RunLayout, shard_count
from shardgen.schemas.run import RunSpec
from shardgen.workers.lifecycle import RunStore, check_resumable, redo_run
from shardgen.workers.queue.doorbell import Doorbell
from shardgen.workers.storage import check_writable, stage_input, write_run_file

from .dataset import prepare_input


@dataclass
class Submitted:
    spec: RunSpec
    rows: int
    shards: int
    queue: str
    requeued: int | None = None
    """On a resume, how many shards were queued again."""


def submit_run(spec: RunSpec, work_dir: str, store: RunStore, console: Console | None = None) -> Submitted:
    console = console or Console(stderr=True)
    spec, table = prepare_input(spec)
    check_writable(work_dir, "work directory")
    rows_total, shards_total = table.num_rows, shard_count(table.num_rows, spec.shard_size)
    layout = RunLayout(work_dir, spec.run_id, spec.shard_size)
    with console.status(f"staging {rows_total:,} rows in {shards_total:,} shards to {layout.input_dir}"):
        stage_input(layout, table)
        write_run_file(layout, spec, rows_total, shards_total)
    queue = store.create_run(spec, work_dir, rows_total, shards_total)
    Doorbell.of(store).ring(queue)
    return Submitted(spec, rows_total, shards_total, queue)


def resume_run(spec: RunSpec, run_id: str, work_dir: str, store: RunStore) -> Submitted:
    """Queue again only the shards of `run_id` without a result, if `spec` asks for the same results."""
    record = store.record(run_id, details=False)
    check_resumable(record.spec, spec, "recorded on this broker")
    if work_dir.rstrip("/") != record.work_dir.rstrip("/"):
        from shardgen.schemas.errors import InvalidParameter

        raise InvalidParameter(f"run {run_id} writes to {record.work_dir}, not {work_dir}", f"pass --work-dir {record.work_dir}")
    layout = RunLayout(record.work_dir, run_id, record.spec.shard_size)
    requeued = redo_run(store, layout)
    Doorbell.of(store).ring(record.queue)
    return Submitted(record.spec, record.rows_total, record.shards_total, record.queue, requeued)
