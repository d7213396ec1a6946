"""Read a dataset through `datasets` and map its columns to InputRows, shard by shard."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

from shardgen.schemas.errors import InputError
from shardgen.schemas.run import ColumnMapping, RunSpec
from shardgen.schemas.shard import InputRow, Shard
from shardgen.workers.storage.datasets import load_dataset_table

PROMPT_COLUMN_GUESSES = ("prompt", "question", "instruction", "input", "text", "query")
MESSAGES_COLUMN_GUESSES = ("messages", "conversation", "conversations")


@dataclass
class ResolvedColumns:
    prompt: str | None
    messages: str | None


def resolve_columns(columns: ColumnMapping, available: list[str]) -> ResolvedColumns:
    """Check every named column exists; guess the prompt column when none is named."""
    named = {
        "--prompt-column": columns.prompt_column,
        "--messages-column": columns.messages_column,
        "--system-column": columns.system_column,
        "--id-column": columns.id_column,
        "--ground-truth-column": columns.ground_truth_column,
    }
    checks = list(named.items()) + [("--keep-columns", c) for c in columns.keep_columns]
    for flag, name in checks:
        if name is not None and name not in available:
            raise InputError(f"column {name!r} ({flag}) is not in the input", f"available columns: {', '.join(available)}")
    if columns.prompt_column or columns.messages_column:
        return ResolvedColumns(columns.prompt_column, columns.messages_column)
    for name in PROMPT_COLUMN_GUESSES:
        if name in available:
            return ResolvedColumns(name, None)
    for name in MESSAGES_COLUMN_GUESSES:
        if name in available:
            return ResolvedColumns(None, name)
    raise InputError(
        "no prompt column found in the input",
        f"name one with --prompt-column or --messages-column (available: {', '.join(available)})",
    )


def to_input_row(index: int, record: dict[str, Any], columns: ColumnMapping, resolved: ResolvedColumns) -> InputRow:
    row = InputRow(index=index, id=str(record[columns.id_column]) if columns.id_column else str(index))
    row.keep = {c: record.get(c) for c in columns.keep_columns}
    if columns.ground_truth_column:
        row.ground_truth = record.get(columns.ground_truth_column)
    if columns.system_column:
        system = record.get(columns.system_column)
        row.system = str(system) if system not in (None, "") else None
    if resolved.messages:
        row.messages, row.error = _messages(record.get(resolved.messages), resolved.messages)
    else:
        row.prompt, row.error = _prompt(record.get(resolved.prompt), resolved.prompt)
    return row


def _prompt(value: Any, column: str | None) -> tuple[str | None, str | None]:
    if value is None:
        return None, f"prompt column {column!r} is null in this row"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, f"prompt column {column!r} is not valid UTF-8 text in this row"
    if not isinstance(value, str):
        value = str(value)
    if not value.strip():
        return None, f"prompt column {column!r} is empty in this row"
    return value, None


def _messages(value: Any, column: str) -> tuple[list[dict[str, Any]] | None, str | None]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None, f"messages column {column!r} holds text that is not a JSON list of messages in this row"
    if not isinstance(value, list) or not value:
        return None, f"messages column {column!r} is not a non-empty list of messages in this row"
    for message in value:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(message.get("content"), str):
            return None, f"messages column {column!r} has an entry without string role and content in this row"
    return [{"role": m["role"], "content": m["content"]} for m in value], None


def iter_shards(spec: RunSpec, dataset: Any) -> Iterator[Shard]:
    """Shards of spec.shard_size rows, in input order; row problems are recorded on the row."""
    resolved = resolve_columns(spec.columns, list(dataset.column_names))
    size = spec.shard_size
    for shard_index, start in enumerate(range(0, len(dataset), size)):
        records = shard_records(dataset, start, start + size)
        rows = [to_input_row(start + i, record, spec.columns, resolved) for i, record in enumerate(records)]
        yield Shard(spec.run_id, shard_index, rows)


def shard_records(dataset: Any, start: int, stop: int) -> list[dict[str, Any]]:
    """Rows start..stop as dicts; text that is not valid UTF-8 stays bytes so its row can say so."""
    try:
        batch = dataset[start:stop]
        return [dict(zip(batch, values)) for values in zip(*batch.values())]
    except UnicodeDecodeError:
        import pyarrow as pa

        table = dataset.with_format("arrow")[start:stop]
        columns = {}
        for name, column in zip(table.column_names, table.columns):
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                columns[name] = [_decode_or_bytes(v) for v in column.cast(pa.binary()).to_pylist()]
            else:
                columns[name] = column.to_pylist()
        return [dict(zip(columns, values)) for values in zip(*columns.values())]


def _decode_or_bytes(value: bytes | None) -> str | bytes | None:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value


def shard_count(rows_total: int, shard_size: int) -> int:
    return -(-rows_total // shard_size)
