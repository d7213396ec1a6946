"""`shardgen run`: the whole job in one process, no services. Same shards, same process_shard, same files."""

from __future__ import annotations

import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from shardgen.schemas.errors import InvalidParameter
from shardgen.schemas.run import RunSpec
from shardgen.workers.generators import make_generator
from shardgen.workers.models.loader import load_model
from shardgen.workers.process_shard import process_shard
from shardgen.workers.writer import shard_path

from .collect import CollectReport, check_output_path, collect, read_run_file, write_run_file
from .dataset import iter_shards, load_dataset_table, resolve_columns, shard_count
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


def parts_dir_for(output: Path) -> Path:
    return output.with_name(output.name + ".parts")


def run_embedded(
    spec: RunSpec,
    output: Path,
    *,
    device: str = "auto",
    batch_size: int = 16,
    hf_token: str | None = None,
    compile: bool = False,
    console: Console | None = None,
) -> RunSummary:
    console = console or Console(stderr=True)
    output = check_output_path(output)
    dataset = load_dataset_table(spec.input, spec.split, spec.limit)
    resolve_columns(spec.columns, list(dataset.column_names))  # a column error stops us before the model loads
    rows_total = len(dataset)
    shards_total = shard_count(rows_total, spec.shard_size)
    started = time.perf_counter()
    loaded = load_model(spec.model, device, hf_token)
    parts = parts_dir_for(output)
    spec = _resume_or_start(spec, parts, rows_total, shards_total, console)
    run_dir = parts / spec.run_id
    if loaded.info.get("note"):
        console.print(f"[yellow]{loaded.info['note']}")
    generator = make_generator(loaded, batch_size, compile=compile)
    console.print(f"model {spec.model.model} ({loaded.source}) on {loaded.device}, quantize={spec.model.quantize}, loaded in {loaded.load_time_s:.1f}s")
    totals = {"rows_failed": 0, "prompt_tokens": 0, "generated_tokens": 0, "resumed": 0}
    with RowProgress(console, rows_total) as progress:
        for shard in iter_shards(spec, dataset):
            if shard_path(run_dir, shard.index).is_file():
                totals["resumed"] += 1
                progress.advance(len(shard.rows))
                continue
            outcome = process_shard(
                shard, spec, loaded, generator, run_dir, on_row=lambda out: progress.advance(1, out.generated_tokens)
            )
            totals["rows_failed"] += outcome.rows_failed
            totals["prompt_tokens"] += outcome.prompt_tokens
            totals["generated_tokens"] += outcome.generated_tokens
    seconds = time.perf_counter() - started
    report = collect(run_dir, spec, rows_total, shards_total, output, allow_partial=True)
    if report.complete or not report.missing_rows:
        shutil.rmtree(parts, ignore_errors=True)
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
        resumed_shards=totals["resumed"],
    )


def _resume_or_start(spec: RunSpec, parts: Path, rows_total: int, shards_total: int, console: Console) -> RunSpec:
    """Reuse the unfinished run in OUT.parts when it is the same job; refuse when it differs."""
    if parts.is_dir():
        for run_dir in sorted(p for p in parts.iterdir() if p.is_dir()):
            previous = read_run_file(run_dir)
            if previous is None:
                continue
            difference = previous[0].difference(spec)
            if difference:
                raise InvalidParameter(
                    f"{parts} holds an unfinished run with a different {difference}",
                    "run again with the same settings to resume it, or delete that directory to start over",
                )
            console.print(f"resuming run {previous[0].run_id} from {run_dir}")
            return previous[0]
    write_run_file(parts / spec.run_id, spec, rows_total, shards_total)
    return spec


def peak_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
