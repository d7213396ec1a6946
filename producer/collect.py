"""Merge a run's results into one Parquet or JSONL file, in input order, every row exactly once.

Shards are read one at a time, in index order, and streamed into one writer, so memory holds one shard
whatever the size of the run. Each shard must hold exactly the input rows of its slice; a missing shard, or
rows that failed, are reported, and nothing is written unless every row is there (or allow_partial).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import IO, Any, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from shardgen.schemas.errors import InputError, StorageError
from shardgen.schemas.layout import RunLayout, part_name
from shardgen.schemas.results import decode_metadata, meta_key
from shardgen.schemas.run import RunSpec
from shardgen.workers.lifecycle import present_results
from shardgen.workers.storage import check_location, open_output, read_schema, read_table

OUTPUT_FORMATS = (".parquet", ".jsonl")


@dataclass
class CollectReport:
    output: str
    rows_total: int
    rows_written: int = 0
    missing_rows: list[int] = field(default_factory=list)
    missing_shards: list[int] = field(default_factory=list)
    failed_rows: list[dict[str, Any]] = field(default_factory=list)
    written: bool = False
    score: Any = None
    """The ScoreSummary of the rows, when collect scored them."""

    failed_rows_allowed: bool = False
    """OpenAI batch output: failed requests are answered in the output and errors files, not a reason to stop."""
    errors_output: str | None = None

    @property
    def complete(self) -> bool:
        return not self.missing_rows and (self.failed_rows_allowed or not self.failed_rows)


class _Incomplete(Exception):
    """Raised inside the output block to throw the partial output away."""


def output_format(output: str) -> str:
    check_location(output, "output")
    suffix = "." + output.rsplit(".", 1)[-1].lower() if "." in output.rsplit("/", 1)[-1] else ""
    if suffix not in OUTPUT_FORMATS:
        raise InputError(f"cannot tell the output format of {output}", "end the output name with .parquet or .jsonl")
    return suffix


def collect(
    layout: RunLayout,
    spec: RunSpec,
    rows_total: int,
    shards_total: int,
    output: str,
    *,
    allow_partial: bool = False,
    recorded_results: Mapping[int, str] | None = None,
    score_metrics: Sequence[str] | None = None,
    row_metadata: bool = False,
    openai_batch: bool | None = None,
) -> CollectReport:
    """Check and merge every shard; `recorded_results` (shard -> object the run store recorded as its result)
    finds results not yet published under their part name. With `score_metrics`, each row gets a `score`
    (producer/score.py); with `row_metadata`, each JSONL row a `metadata` object as the Inferencer wrote it.
    `openai_batch` writes the OpenAI Batch API's output format and its errors file (default: when the run's
    input was a batch file); failed requests are then answered in those files and do not stop the writing."""
    fmt = output_format(output)
    openai_batch = spec.input_format == "openai-batch" if openai_batch is None else openai_batch
    if openai_batch:
        check_batch_output(spec, output, fmt)
    if row_metadata and fmt != ".jsonl":
        raise InputError("--row-metadata adds a metadata object to each JSONL row", "write the output to a .jsonl file")
    report = CollectReport(output, rows_total, failed_rows_allowed=bool(openai_batch))
    locations = _result_locations(layout, shards_total, recorded_results or {})
    report.missing_shards = [index for index, location in enumerate(locations) if location is None]
    for index in report.missing_shards:
        report.missing_rows.extend(layout.shard_rows(index, rows_total))
    if len(report.missing_shards) == shards_total:
        return report
    try:
        with open_output(output) as handle, _errors_output(output if openai_batch else None) as errors:
            if openai_batch:
                from .openai_batch import BatchOutputSink

                sink: Any = BatchOutputSink(handle, errors, spec.run_id)
            elif fmt == ".parquet":
                sink = _ParquetSink(handle, _provenance(spec, [loc for loc in locations if loc]))
            else:
                sink = _JsonlSink(handle, spec if row_metadata else None)
            for index, location in enumerate(locations):
                if location is None:
                    continue
                table = _checked_shard(read_table(location), location, spec, layout.shard_rows(index, rows_total))
                report.failed_rows.extend(_failed_rows(table))
                if score_metrics is not None:
                    table, summary = _score(table, score_metrics)
                    if report.score is None:
                        report.score = summary
                    else:
                        report.score.add(summary)
                sink.write(table)
                report.rows_written += table.num_rows
            sink.close()
            if not (report.complete or allow_partial):
                raise _Incomplete
    except _Incomplete:
        return report
    report.written = True
    return report


def check_batch_output(spec: RunSpec, output: str, fmt: str) -> None:
    if fmt != ".jsonl":
        raise InputError("the OpenAI batch output format is JSONL", "write the output to a .jsonl file")
    if spec.input_format != "openai-batch":
        raise InputError(f"run {spec.run_id} was not made from an OpenAI batch file (its input format is "
                         f"{spec.input_format})", "collect it as .parquet or .jsonl rows, without --output-format")


@contextlib.contextmanager
def _errors_output(output: str | None) -> Iterator[IO[bytes] | None]:
    """The errors file beside a batch output (written whole, even empty, as the output is); None otherwise."""
    if output is None:
        yield None
        return
    from .openai_batch import errors_location

    with open_output(errors_location(output)) as handle:
        yield handle


def _result_locations(layout: RunLayout, shards_total: int, recorded: Mapping[int, str]) -> list[str | None]:
    present = present_results(layout)
    locations: list[str | None] = []
    for index in range(shards_total):
        if part_name(index) in present:
            locations.append(layout.part(index))
        elif index in recorded and recorded[index].rstrip("/").rsplit("/", 1)[-1] in present:
            locations.append(recorded[index])
        else:
            locations.append(None)
    return locations


PROVENANCE_KEYS = ("generator", "weights", "quantize", "model_source", "adapter", "version")


def _provenance(spec: RunSpec, locations: list[str]) -> dict[bytes, bytes]:
    """What the collected file says of itself: the run, model and parameters, and what the shards recorded about
    how they were made (generator path, quantization, checkpoint, version), each value once. Only the shards'
    footers are read (in parallel, for object stores)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=16) as pool:
        shards = [decode_metadata(schema.metadata) for schema in pool.map(read_schema, locations)]
    entries = {"run_id": spec.run_id, "model": spec.model.model, "params": spec.params.to_json()}
    for key in PROVENANCE_KEYS:
        values = list(dict.fromkeys(shard[key] for shard in shards if shard.get(key)))
        if values:
            entries[key] = ", ".join(values)
    return {meta_key(key): value.encode() for key, value in entries.items()}


def _score(table: pa.Table, metrics: Sequence[str]) -> tuple[pa.Table, Any]:
    from .score import score_table

    return score_table(table, metrics or None)


def _checked_shard(table: pa.Table, location: str, spec: RunSpec, expected: range) -> pa.Table:
    found = decode_metadata(table.schema.metadata).get("run_id")
    if found != spec.run_id:
        raise InputError(f"{location} belongs to run {found}, not {spec.run_id}", "remove the stray file or collect the right run")
    indices = table.column("row_index").to_pylist()
    if indices != list(expected):
        raise InputError(
            f"{location} holds rows {indices[:1]}..{indices[-1:]} ({len(indices)}), not rows {expected.start}..{expected.stop - 1}",
            "remove the stray file and run `shardgen retry` for its shard",
        )
    return table.replace_schema_metadata(None)


def _failed_rows(table: pa.Table) -> list[dict[str, Any]]:
    errors = table.column("error")
    if errors.null_count == table.num_rows:
        return []
    failed = table.filter(errors.is_valid()).select(["row_index", "id", "error"])
    return failed.to_pylist()


class _ParquetSink:
    """One Parquet writer; shards whose inferred types differ from the first one's are cast to its schema."""

    def __init__(self, handle: IO[bytes], metadata: dict[bytes, bytes]):
        self.handle, self.metadata = handle, metadata
        self.writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.handle, table.schema.with_metadata(self.metadata))
        schema = self.writer.schema
        if not table.schema.equals(schema, check_metadata=False):
            try:
                table = table.cast(schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise StorageError(f"shard columns differ in type and cannot be merged: {exc}", "collect to .jsonl instead") from None
        self.writer.write_table(table)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _JsonlSink:
    """One JSON object per row; with a spec, each carries the Inferencer's `metadata` object."""

    def __init__(self, handle: IO[bytes], metadata_of: RunSpec | None = None):
        self.handle, self.spec = handle, metadata_of

    def write(self, table: pa.Table) -> None:
        for batch in table.to_batches(max_chunksize=4096):
            records = batch.to_pylist()
            if self.spec is not None:
                from shardgen.compat.inferencer import row_metadata

                records = [{**r, "metadata": row_metadata(r, self.spec.model.model, self.spec.params)} for r in records]
            lines = [json.dumps(record, ensure_ascii=False, default=str) for record in records]
            self.handle.write(("\n".join(lines) + "\n").encode())

    def close(self) -> None:
        pass
