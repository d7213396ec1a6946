"""The producer's view of the input: read it once, check the column mapping, cut it into shards of rows."""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa

from shardgen.schemas.errors import InputError
from shardgen.schemas.layout import shard_count
from shardgen.schemas.rows import resolve_columns, shard_from_table, used_columns
from shardgen.schemas.run import RunSpec
from shardgen.schemas.shard import Shard
from shardgen.workers.storage import load_dataset_table


def prepare_input(spec: RunSpec) -> tuple[RunSpec, pa.Table]:
    """The run's spec with its input format decided, and its input table: an OpenAI batch file (named so, or of
    that shape) becomes one row per request with its own parameters (producer/openai_batch.py)."""
    from dataclasses import replace

    from . import openai_batch

    if spec.input_format in ("auto", openai_batch.FORMAT):
        first = _first_jsonl_line(spec.input)
        if spec.input_format == openai_batch.FORMAT or (first is not None and openai_batch.looks_like_batch_file(first)):
            if first is None:
                raise InputError(f"{spec.input} is not a JSONL file", "an OpenAI batch input file is .jsonl")
            from shardgen.workers.storage import open_input

            with open_input(spec.input) as handle:
                lines = [line.decode("utf-8", "replace") for line in handle]
            spec, table = openai_batch.read_batch_file(lines[: spec.limit] if spec.limit else lines, spec)
            return spec, table
    spec = replace(spec, input_format="rows")
    return spec, read_input(spec)


def _first_jsonl_line(location: str) -> str | None:
    """The first non-empty line of a .jsonl file (local or URL), or None for anything else."""
    if not location.lower().endswith(".jsonl"):
        return None
    from shardgen.workers.storage import open_input

    try:
        with open_input(location) as handle:
            for line in handle:
                if line.strip():
                    return line.decode("utf-8", "replace")
    except Exception:  # read_input says what is wrong with the location
        return None
    return None


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
