"""The producer's view of the input: read it once, check the column mapping, cut it into shards of rows."""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa

from shardgen.schemas.layout import shard_count
from shardgen.schemas.rows import resolve_columns, shard_from_table, used_columns
from shardgen.schemas.run import RunSpec
from shardgen.schemas.shard import Shard
from shardgen.workers.storage import load_dataset_table


def read_input(spec: RunSpec) -> pa.Table:
    """The columns of the input the run uses, as one Arrow table; column errors are raised here, before any
    work is recorded or done."""
    dataset = load_dataset_table(spec.input, spec.split, spec.limit, subset=spec.subset, revision=spec.revision)
    resolved = resolve_columns(spec.columns, list(dataset.column_names))
    return dataset.select_columns(used_columns(spec.columns, resolved)).with_format("arrow")[:]


def shard_slices(table: pa.Table, shard_size: int) -> Iterator[tuple[int, pa.Table]]:
    for index in range(shard_count(table.num_rows, shard_size)):
        yield index, table.slice(index * shard_size, shard_size)


def iter_shards(spec: RunSpec, table: pa.Table) -> Iterator[Shard]:
    for index, rows in shard_slices(table, spec.shard_size):
        yield shard_from_table(spec, index, rows)
