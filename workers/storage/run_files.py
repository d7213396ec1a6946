"""A run's files under its work directory (layout in schemas/layout.py): run.json, staged input, results."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shardgen.schemas.errors import InputError
from shardgen.schemas.layout import RunLayout, join
from shardgen.schemas.run import RunSpec

from . import files


# ---------------------------------------------------------------- run.json
def write_run_file(layout: RunLayout, spec: RunSpec, rows_total: int, shards_total: int) -> None:
    record = {"spec": spec.to_dict(), "rows_total": rows_total, "shards_total": shards_total}
    files.write_bytes(layout.run_file, json.dumps(record, indent=2).encode())


def read_run_file(run_dir: str) -> tuple[RunSpec, int, int] | None:
    """(spec, rows_total, shards_total) of the run in `run_dir`, or None when it holds no run.json."""
    location = join(run_dir, "run.json")
    if not files.exists(location):
        return None
    try:
        record = json.loads(files.read_bytes(location))
        return RunSpec.from_dict(record["spec"]), int(record["rows_total"]), int(record["shards_total"])
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{location} is not a shardgen run file ({exc})", "point at a run directory written by shardgen") from None


# ---------------------------------------------------------------- parquet objects
def write_table(location: str, table: pa.Table, **options: Any) -> None:
    with files.open_output(location) as handle:
        pq.write_table(table, handle, **options)


def read_table(location: str) -> pa.Table:
    with files.open_input(location) as handle, files.storage_errors(location, "read"):
        return pq.read_table(handle)


def read_schema(location: str) -> pa.Schema:
    with files.open_input(location) as handle, files.storage_errors(location, "read"):
        return pq.ParquetFile(handle).schema_arrow


# ---------------------------------------------------------------- staged input
def stage_input(layout: RunLayout, table: pa.Table) -> int:
    """Write the input once, `shards_per_block` shards per file and one row group per shard; returns files."""
    rows_per_block = layout.shard_size * layout.shards_per_block
    blocks = 0
    for blocks, start in enumerate(range(0, table.num_rows, rows_per_block), start=1):
        write_table(layout.input_block(blocks - 1), table.slice(start, rows_per_block), row_group_size=layout.shard_size)
    return blocks


def read_staged_shard(layout: RunLayout, shard_index: int) -> pa.Table:
    """The input rows of one shard, as staged at submit (retries, resumes and reaped shards read the same)."""
    location, group = layout.input_location(shard_index)
    with files.open_input(location) as handle, files.storage_errors(location, "read"):
        return pq.ParquetFile(handle).read_row_group(group)


# ---------------------------------------------------------------- results
def new_attempt_token(attempt: int) -> str:
    return f"a{attempt}-{uuid.uuid4().hex[:12]}"


def publish_result(layout: RunLayout, shard_index: int, attempt_location: str) -> str:
    """Make the attempt the run store recorded as the shard's result available under the shard's part name."""
    files.move(attempt_location, layout.part(shard_index))
    return layout.part(shard_index)


def result_location(layout: RunLayout, shard_index: int, recorded: str | None) -> str | None:
    """Where a shard's result is: its part name, or the recorded attempt object not yet published there."""
    part = layout.part(shard_index)
    if files.exists(part):
        return part
    if recorded and files.exists(recorded):
        return recorded
    return None
