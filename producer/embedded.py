"""`shardgen run`: the whole job in one process, no services. Same shards, same process_shard, same files."""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from typing import Sequence

from rich.console import Console

from shardgen.schemas.errors import InputError
from shardgen.schemas.layout import RunLayout, is_url, join, shard_count
from shardgen.schemas.rows import shard_from_table
from shardgen.schemas.run import RunSpec
from shardgen.schemas.runtime import RuntimeOptions
from shardgen.workers import load_generator, process_shard
from shardgen.workers.lifecycle import check_resumable, unfinished_shards
from shardgen.workers.storage import (
    check_writable,
    list_names,
    new_attempt_token,
    publish_result,
    read_run_file,
    remove_tree,
    write_run_file,
)

from .collect import CollectReport, collect, output_format
from .dataset import prepare_input
from .display import RowProgress


@dataclass
class RunSummary:
    spec: RunSpec
    report: CollectReport
    rows: int
    rows_failed: int
    prompt_tokens: int
    generated_tokens: int
    seconds: float
    load_seconds: float
    peak_memory_bytes: int
    resumed_shards: int

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0


def parts_dir_for(output: str) -> str:
    return output + ".parts"


def run_embedded(
    spec: RunSpec,
    output: str | os.PathLike,
    runtime: RuntimeOptions | None = None,
    *,
    score_metrics: Sequence[str] | None = None,
    row_metadata: bool = False,
    console: Console | None = None,
    openai_batch: bool | None = None,
) -> RunSummary:
    console = console or Console(stderr=True)
    runtime = runtime or RuntimeOptions.from_options({})
    output = str(output)
    suffix = output_format(output)  # an output name of unknown format is refused here, before any work
    if row_metadata and suffix != ".jsonl":
        raise InputError("--row-metadata adds a metadata object to each JSONL row", "write the output to a .jsonl file")
    spec, table = prepare_input(spec)
    if openai_batch or (openai_batch is None and spec.input_format == "openai-batch"):
        from .collect import check_batch_output

        check_batch_output(spec, output, suffix)
    parts = parts_dir_for(output)
    check_writable(parent_of(output), "output directory")
    rows_total = table.num_rows
    shards_total = shard_count(rows_total, spec.shard_size)
    previous = _previous_run(spec, parts)
    started = time.perf_counter()
    loaded, generator = load_generator(spec.model, runtime)  # a model that cannot load leaves nothing behind
    if previous is not None:
        spec = previous
        console.print(f"resuming run {spec.run_id} from {join(parts, spec.run_id)}")
    layout = RunLayout(parts, spec.run_id, spec.shard_size)
    if previous is None:
        write_run_file(layout, spec, rows_total, shards_total)
    todo = unfinished_shards(layout, shards_total)
    if loaded.info.get("note"):
        console.print(f"[yellow]{loaded.info['note']}")
    console.print(f"model {spec.model.model} ({loaded.source}) on {loaded.device}, quantize={spec.model.quantize}, "
                  f"{generator.name}, loaded in {loaded.load_time_s:.1f}s")
    totals = {"rows_failed": 0, "prompt_tokens": 0, "generated_tokens": 0}
    with RowProgress(console, rows_total) as progress:
        progress.advance(rows_total - sum(len(layout.shard_rows(i, rows_total)) for i in todo))
        for index in todo:
            rows = table.slice(index * spec.shard_size, spec.shard_size)
            location = layout.attempt_part(index, new_attempt_token(1))
            outcome = process_shard(
                shard_from_table(spec, index, rows), spec, loaded, generator, location,
                on_row=lambda out: progress.advance(1, out.generated_tokens),
            )
            publish_result(layout, index, location)
            totals["rows_failed"] += outcome.rows_failed
            totals["prompt_tokens"] += outcome.prompt_tokens
            totals["generated_tokens"] += outcome.generated_tokens
    seconds = time.perf_counter() - started
    report = collect(layout, spec, rows_total, shards_total, output, allow_partial=True, score_metrics=score_metrics,
                     row_metadata=row_metadata, openai_batch=openai_batch)
    if report.complete or not report.missing_rows:
        remove_tree(parts)
    return RunSummary(
        spec=spec,
        report=report,
        rows=rows_total,
        rows_failed=len(report.failed_rows),
        prompt_tokens=totals["prompt_tokens"],
        generated_tokens=totals["generated_tokens"],
        seconds=seconds,
        load_seconds=loaded.load_time_s,
        peak_memory_bytes=peak_memory_bytes(loaded.device),
        resumed_shards=shards_total - len(todo),
    )


def parent_of(location: str) -> str:
    return location.rsplit("/", 1)[0] if is_url(location) else os.path.dirname(os.path.abspath(os.path.expanduser(location)))


def _previous_run(spec: RunSpec, parts: str) -> RunSpec | None:
    """The unfinished run in OUT.parts if it is the same job (resumed); refused when it differs."""
    for name in list_names(parts):
        found = read_run_file(join(parts, name))
        if found is not None:
            check_resumable(found[0], spec, parts)
            return found[0]
    return None


def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
