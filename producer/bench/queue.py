"""`shardgen bench queue`: what the queue costs. The same job through `run` (embedded) and through
`submit` + one `shardgen worker`, in one command; prints tokens/s of each and their ratio."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from shardgen.schemas.model import ModelSpec
from shardgen.schemas.run import RunSpec
from shardgen.schemas.sampling import SamplingParams

from .prompts import write_prompts
from .support import start_private_redis
from ..command_support import out
from ..display import rows_table

console = Console(stderr=True)


def start_worker(model: str, device: str, batch_size: int, broker: str, log_path: Path, engine: str = "auto",
                 max_memory: str | None = None) -> subprocess.Popen:
    log = open(log_path, "wb")
    command = [sys.executable, "-m", "shardgen.producer.cli", "worker", "--model", model, "--device", device,
               "--batch-size", str(batch_size), "--broker", broker, "--engine", engine,
               *(["--max-memory", max_memory] if max_memory else [])]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while b" ready." not in log_path.read_bytes():
        if process.poll() is not None or time.time() > deadline:
            raise click.ClickException(f"the worker did not start:\n{log_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)
    return process


def embedded_rate(spec: RunSpec, output: Path, device: str, batch_size: int, engine: str = "auto",
                  max_memory: str | None = None) -> dict[str, Any]:
    from ..embedded import run_embedded

    from shardgen.schemas.runtime import RuntimeOptions

    runtime = RuntimeOptions(device=device, batch_size=batch_size, engine=engine, max_memory=max_memory)
    summary = run_embedded(spec, output, runtime, console=Console(stderr=True, quiet=True))
    seconds = summary.seconds - summary.load_seconds
    return {"mode": "embedded (run)", "rows": summary.rows, "tokens": summary.generated_tokens, "seconds": seconds}


def distributed_rate(spec: RunSpec, work_dir: Path, broker: str) -> dict[str, Any]:
    from shardgen.workers.lifecycle import RunStore

    from ..submit import submit_run

    store = RunStore(broker)
    started = time.time()
    submit_run(spec, str(work_dir), store, Console(stderr=True, quiet=True))
    while not (record := store.record(spec.run_id, details=False)).finished:
        time.sleep(0.2)
    seconds = (record.finished_at or time.time()) - started
    if record.state.value != "done":
        raise click.ClickException(f"the distributed run ended {record.state.value}")
    return {"mode": "distributed (submit + 1 worker)", "rows": record.rows_done, "tokens": record.generated_tokens, "seconds": seconds}


@click.command("queue")
@click.option("--model", default="smollm2-135m", show_default=True, help="Model alias, checkpoint directory or hub id.")
@click.option("--device", default="cpu", show_default=True, help="Device of both modes.")
@click.option("--rows", type=click.IntRange(min=1), default=96, show_default=True, help="Prompts in the job.")
@click.option("--shard-size", type=click.IntRange(min=1), default=32, show_default=True, help="Rows per shard.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Batch size of both modes.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="New tokens per prompt.")
@click.option("--engine", default="auto", show_default=True,
              help="Generator of both modes: shardgen, vllm, hf-generate or auto (vLLM on CUDA when installed).")
@click.option("--max-memory", help="KV cache budget of both modes (e.g. 1GiB) [default: each engine's own].")
@click.option("--broker", help="Redis URL to use [default: start a private redis-server on a free port].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the prompts and of generation.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench_queue(model: str, device: str, rows: int, shard_size: int, batch_size: int, max_new_tokens: int,
                engine: str, max_memory: str | None, broker: str | None, seed: int, as_json: bool) -> None:
    """Run one greedy job embedded and through Redis + one worker; report tokens/s and the ratio.

    The worker is started and loaded before the clock starts, and the embedded time excludes model
    loading, so the ratio is what the queue (submit, messages, leases, Parquet, status) costs.
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    scratch = Path(tempfile.mkdtemp(prefix="shardgen-bench-queue-"))
    redis_process = worker = None
    try:
        data = write_prompts(scratch / "prompts.jsonl", rows, seed)
        params = SamplingParams(max_new_tokens=max_new_tokens, seed=seed)
        make_spec = lambda: RunSpec(input=str(data), model=ModelSpec(model=model), params=params, shard_size=shard_size)  # noqa: E731
        if broker is None:
            redis_process, broker = start_private_redis(scratch)
        console.print("starting one worker ...")
        worker = start_worker(model, device, batch_size, broker, scratch / "worker.log", engine, max_memory)
        console.print("distributed run ...")
        distributed = distributed_rate(make_spec(), scratch / "work", broker)
        console.print("embedded run ...")
        embedded = embedded_rate(make_spec(), scratch / "embedded.parquet", device, batch_size, engine, max_memory)
    finally:
        for process in (worker, redis_process):
            if process is not None:
                process.terminate()
                process.wait(30)
        shutil.rmtree(scratch, ignore_errors=True)
    results = [embedded, distributed]
    for result in results:
        result["tokens_per_s"] = result["tokens"] / result["seconds"] if result["seconds"] > 0 else 0.0
        result["ratio_to_embedded"] = result["tokens_per_s"] / embedded["tokens_per_s"] if embedded["tokens_per_s"] else 0.0
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    out.print(rows_table(
        f"queue overhead: {rows} rows, shards of {shard_size}, batch {batch_size}, {max_new_tokens} new tokens, {device}, "
        f"engine {engine}",
        ["mode", "rows", "tokens", "seconds", "tokens/s", "ratio"],
        [(r["mode"], r["rows"], r["tokens"], f"{r['seconds']:.1f}", f"{r['tokens_per_s']:.1f}", f"{r['ratio_to_embedded']:.2f}x") for r in results],
    ))
