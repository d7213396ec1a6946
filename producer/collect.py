"""Merge a run's result shards into one Parquet or JSONL file, in input order, every row exactly once."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shardgen.schemas.errors import InputError
from shardgen.schemas.results import decode_metadata, meta_key
from shardgen.schemas.run import RunSpec
from shardgen.schemas.shard import shard_file_name

RUN_FILE = "run.json"
OUTPUT_FORMATS = (".parquet", ".jsonl")


@dataclass
class CollectReport:
    output: Path
    rows_total: int
    rows_written: int
    missing_rows: list[int] = field(default_factory=list)
    missing_shards: list[int] = field(default_factory=list)
    failed_rows: list[dict[str, Any]] = field(default_factory=list)
    generated_tokens: int = 0
    written: bool = False

    @property
    def complete(self) -> bool:
        return not self.missing_rows and not self.failed_rows


def check_output_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_FORMATS:
        raise InputError(f"cannot tell the output format of {path}", "end the output name with .parquet or .jsonl")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output directory {path.parent}: {exc.strerror}", "pass a writable -o path") from None
    return path


def write_run_file(run_dir: Path, spec: RunSpec, rows_total: int, shards_total: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"spec": spec.to_dict(), "rows_total": rows_total, "shards_total": shards_total}
    temp = run_dir / f".{RUN_FILE}.{uuid.uuid4().hex}"
    temp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    os.replace(temp, run_dir / RUN_FILE)


def read_run_file(run_dir: Path) -> tuple[RunSpec, int, int] | None:
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    return RunSpec.from_dict(record["spec"]), int(record["rows_total"]), int(record["shards_total"])


def collect(run_dir: Path, spec: RunSpec, rows_total: int, shards_total: int, output: Path, *, allow_partial: bool = False) -> CollectReport:
    """Check the shards; write OUTPUT when every row is there (or allow_partial). The report lists the rest."""
    output = check_output_path(output)
    tables, missing_shards = [], []
    for index in range(shards_total):
        path = run_dir / shard_file_name(index)
        if not path.is_file():
            missing_shards.append(index)
            continue
        table = pq.read_table(path)
        found = decode_metadata(table.schema.metadata).get("run_id")
        if found != spec.run_id:
            raise InputError(f"{path} belongs to run {found}, not {spec.run_id}", "remove the stray file or collect the right run")
        tables.append(table.replace_schema_metadata(None))
    merged = pa.concat_tables(tables, promote_options="permissive") if tables else None
    report = CollectReport(output, rows_total, 0, missing_shards=missing_shards)
    if merged is not None:
        merged = merged.sort_by("row_index")
        indices = merged.column("row_index").to_pylist()
        if len(set(indices)) != len(indices):
            raise InputError(f"run {spec.run_id} has rows recorded twice in {run_dir}", "remove duplicate part files and collect again")
        seen = set(indices)
        report.missing_rows = [i for i in range(rows_total) if i not in seen]
        errors = merged.column("error").to_pylist()
        ids = merged.column("id").to_pylist()
        report.failed_rows = [
            {"row_index": index, "id": row_id, "error": error}
            for index, row_id, error in zip(indices, ids, errors)
            if error is not None
        ]
        report.rows_written = merged.num_rows
        report.generated_tokens = sum(merged.column("generated_tokens").to_pylist())
    else:
        report.missing_rows = list(range(rows_total))
    if merged is not None and (report.complete or allow_partial):
        report.written = True
        metadata = {meta_key("run_id"): spec.run_id.encode(), meta_key("model"): spec.model.model.encode(), meta_key("params"): spec.params.to_json().encode()}
        write_output(merged.replace_schema_metadata(metadata), output)
    return report


def write_output(table: pa.Table, output: Path) -> None:
    temp = output.with_name(f".{output.name}.{uuid.uuid4().hex}.tmp")
    try:
        if output.suffix.lower() == ".parquet":
            pq.write_table(table, temp)
        else:
            with open(temp, "w", encoding="utf-8") as handle:
                for batch in table.to_batches(max_chunksize=4096):
                    for record in batch.to_pylist():
                        handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        os.replace(temp, output)
    finally:
        temp.unlink(missing_ok=True)
