"""How a dataset's columns become InputRows (the ColumnMapping contract), the same on every side.

The producer checks the mapping against the input before a run is recorded; the embedded run and the workers
turn Arrow slices of the input (or of its staged copy) into rows with the same functions, so a row means the
same thing wherever it is generated. Problems of one row are recorded on the row, never raised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import InputError
from .run import ColumnMapping, RunSpec
from .shard import InputRow, Shard

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
        "--params-column": columns.params_column,
        "error column": columns.error_column,
        "--adapter-column": columns.adapter_column,
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
    if columns.adapter_column:
        adapter = record.get(columns.adapter_column)
        row.adapter = str(adapter) if adapter not in (None, "") else None
    if resolved.messages:
        row.messages, row.error = _messages(record.get(resolved.messages), resolved.messages)
    else:
        row.prompt, row.error = _prompt(record.get(resolved.prompt), resolved.prompt)
    if columns.params_column:
        row.params, params_error = _params(record.get(columns.params_column), columns.params_column)
        row.error = row.error or params_error
    if columns.error_column and record.get(columns.error_column):
        row.error = str(record[columns.error_column])
    return row


def _params(value: Any, column: str) -> tuple[dict[str, Any] | None, str | None]:
    """A row's own parameters: a JSON object (or its text); null or empty means the run's."""
    if value is None or value == "":
        return None, None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None, f"params column {column!r} holds text that is not a JSON object in this row"
        if not isinstance(value, dict):
            return None, f"params column {column!r} is not a JSON object of generation parameters in this row"
        return value, None
    if not isinstance(value, dict):
        return None, f"params column {column!r} is not a JSON object of generation parameters in this row"
    return _without_nulls(value), None


def _without_nulls(value: Any) -> Any:
    """An object read as an Arrow struct has every key any row has, null where this row has none: drop them.
    (A params column of JSON text keeps nulls that mean something, e.g. in a schema.)"""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


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


def used_columns(columns: ColumnMapping, resolved: ResolvedColumns) -> list[str]:
    """The input columns a run reads: the prompt (or messages), system, id, ground truth and kept columns."""
    named = [resolved.prompt, resolved.messages, columns.system_column, columns.id_column, columns.ground_truth_column,
             columns.params_column, columns.error_column, columns.adapter_column]
    return list(dict.fromkeys(c for c in [*named, *columns.keep_columns] if c))


def rows_from_table(table: Any, first_index: int, columns: ColumnMapping) -> list[InputRow]:
    """InputRows of an Arrow table whose first row is input row `first_index`."""
    resolved = resolve_columns(columns, list(table.column_names))
    return [to_input_row(first_index + i, record, columns, resolved) for i, record in enumerate(table_records(table))]


def shard_from_table(spec: RunSpec, index: int, rows: Any) -> Shard:
    """Shard `index` of a run from its slice of the input (read whole by `run`, or staged at submit)."""
    copied = [*spec.columns.keep_columns, *filter(None, [spec.columns.ground_truth_column])]
    types = {name: rows.schema.field(name).type for name in copied if name in rows.column_names}
    return Shard(spec.run_id, index, rows_from_table(rows, index * spec.shard_size, spec.columns), types)


def table_records(table: Any) -> list[dict[str, Any]]:
    """An Arrow table's rows as dicts, decoded the way `datasets` decodes them (its features travel in the
    schema's metadata, e.g. messages of uneven shape stored as JSON); text that is not valid UTF-8 stays bytes
    so its row can say so."""
    try:
        columns = table.to_pydict()
    except UnicodeDecodeError:
        columns = {name: _strings_or_bytes(column) for name, column in zip(table.column_names, table.columns)}
    if _needs_decoding(table.schema.metadata):
        import datasets

        columns = datasets.Features.from_arrow_schema(table.schema).decode_batch(columns)
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


PLAIN_FEATURES = {"Value", "List", "LargeList", "Sequence", "ClassLabel"}
"""`datasets` feature types whose Arrow values are already what decoding gives (no need to import it)."""


def _needs_decoding(metadata: dict[bytes, bytes] | None) -> bool:
    raw = (metadata or {}).get(b"huggingface")
    if not raw:
        return False
    try:
        features = json.loads(raw)["info"]["features"]
    except (ValueError, KeyError, TypeError):
        return True
    return bool(_feature_types(features) - PLAIN_FEATURES)


def _feature_types(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["_type"]} if isinstance(node.get("_type"), str) else set()
        return found.union(*(_feature_types(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_feature_types(item) for item in node))
    return set()


def _strings_or_bytes(column: Any) -> list[Any]:
    import pyarrow as pa

    if pa.types.is_string(column.type):
        return [_decode_or_bytes(v) for v in column.cast(pa.binary()).to_pylist()]
    if pa.types.is_large_string(column.type):
        return [_decode_or_bytes(v) for v in column.cast(pa.large_binary()).to_pylist()]
    return column.to_pylist()


def _decode_or_bytes(value: bytes | None) -> str | bytes | None:
    if value is None:
        return None
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value
