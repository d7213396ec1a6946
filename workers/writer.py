"""Result shards: one Parquet file per shard, written whole or not at all, first complete one wins."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from shardgen.schemas.results import meta_key
from shardgen.schemas.run import RunSpec
from shardgen.schemas.shard import InputRow, shard_file_name

from .generation import FINISH_ERROR, GenerationOutput
from .prompts import PromptTokens


def result_table(
    spec: RunSpec,
    rows: Sequence[InputRow],
    outputs: Sequence[GenerationOutput],
    prompts: Sequence[PromptTokens | None],
    metadata: dict[str, str],
) -> pa.Table:
    many = spec.params.n > 1
    text_type = pa.list_(pa.string()) if many else pa.string()
    generation, finish = [], []
    for output in outputs:
        texts = [s.text for s in output.samples]
        reasons = [s.finish_reason for s in output.samples]
        if output.error is not None:
            generation.append(None)
            finish.append([FINISH_ERROR] * spec.params.n if many else FINISH_ERROR)
        else:
            generation.append(texts if many else texts[0])
            finish.append(reasons if many else reasons[0])
    columns: dict[str, pa.Array] = {
        "id": pa.array([r.id for r in rows], pa.string()),
        "row_index": pa.array([r.index for r in rows], pa.int64()),
    }
    for name in spec.columns.keep_columns:
        columns[name] = _infer_array([r.keep.get(name) for r in rows])
    if spec.columns.ground_truth_column:
        columns["ground_truth"] = _infer_array([r.ground_truth for r in rows])
    columns[spec.columns.output_column] = pa.array(generation, text_type)
    columns["finish_reason"] = pa.array(finish, text_type)
    columns["prompt_tokens"] = pa.array([o.prompt_tokens for o in outputs], pa.int32())
    columns["generated_tokens"] = pa.array([o.generated_tokens for o in outputs], pa.int32())
    columns["generation_time_s"] = pa.array([o.generation_time_s for o in outputs], pa.float64())
    columns["prompt_truncated"] = pa.array([p is not None and p.truncated_from is not None for p in prompts], pa.bool_())
    columns["error"] = pa.array([o.error for o in outputs], pa.string())
    table = pa.table(columns)
    return table.replace_schema_metadata({meta_key(k): str(v).encode() for k, v in metadata.items()})


def _infer_array(values: list[Any]) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def shard_path(run_dir: Path, shard_index: int) -> Path:
    return run_dir / shard_file_name(shard_index)


def write_shard_once(table: pa.Table, path: Path) -> bool:
    """Write to a temp file, then link it into place without replacing: True if ours is the result.

    A late duplicate (a retried shard whose first attempt finishes after all) finds the file there and
    leaves it alone, so the first complete result wins and nothing is doubled.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, temp)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        except OSError:  # filesystems without hard links: rename, which is atomic but may replace
            if path.exists():
                return False
            os.replace(temp, path)
        return True
    finally:
        temp.unlink(missing_ok=True)
