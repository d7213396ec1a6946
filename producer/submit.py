"""`shardgen submit`: read and shard the dataset, record the run in Redis, enqueue one task per shard."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from shardgen.schemas.errors import InputError
from shardgen.schemas.run import RunSpec
from shardgen.schemas.shard import ShardMessage, rows_to_json
from shardgen.workers.queue.celery_app import configure, enqueue
from shardgen.workers.lifecycle.store import RunRecord, RunStore
from shardgen.workers.writer import shard_path

from .collect import write_run_file
from .dataset import iter_shards, load_dataset_table, shard_count
from .display import RowProgress


def submit_run(spec: RunSpec, work_dir: Path, store: RunStore, broker: str, console: Console | None = None) -> tuple[int, int]:
    """Returns (rows, shards). The dataset is read before anything is recorded, so bad input leaves no trace."""
    console = console or Console(stderr=True)
    work_dir = work_dir.expanduser().resolve()
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create work directory {work_dir}: {exc.strerror}", "pass a writable --work-dir") from None
    dataset = load_dataset_table(spec.input, spec.split, spec.limit)
    shards = iter_shards(spec, dataset)
    first = next(shards)  # column errors surface here, before the run is recorded
    rows_total, shards_total = len(dataset), shard_count(len(dataset), spec.shard_size)
    write_run_file(work_dir / spec.run_id, spec, rows_total, shards_total)
    store.create_run(spec, str(work_dir))
    app = configure(broker)
    with RowProgress(console, rows_total, "enqueueing") as progress:
        for shard in [first, *shards]:
            rows_json = rows_to_json(shard.rows)
            store.add_shard(spec.run_id, shard.index, shard.rows, rows_json)
            enqueue(app, ShardMessage(spec.run_id, shard.index, shard.rows).to_dict(), spec.model.queue)
            progress.advance(len(shard.rows))
    return rows_total, shards_total


def shards_to_redo(record: RunRecord) -> list[int]:
    """Shards without a complete result: not done (and not running under a live lease), or done with no file."""
    run_dir = Path(record.work_dir) / record.run_id
    redo = []
    for shard in record.shards:
        if shard.state == "running":
            continue
        if shard.state != "done" or not shard_path(run_dir, shard.index).is_file():
            redo.append(shard.index)
    return redo


def requeue(store: RunStore, broker: str, record: RunRecord, indices: list[int]) -> int:
    """Queue these shards again from the rows kept in Redis (the input file is not needed)."""
    count = store.reset_shards(record.run_id, indices)
    app = configure(broker)
    for index in indices:
        rows = store.shard_rows(record.run_id, index)
        enqueue(app, ShardMessage(record.run_id, index, rows, attempt=1).to_dict(), record.spec.model.queue)
    return count
