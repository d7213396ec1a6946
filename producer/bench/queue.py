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

from shardgen.schemas.model import ModelSpec, pinned_engine
from shardgen.schemas.run import RunSpec
from shardgen.schemas.sampling import SamplingParams

from .prompts import write_prompts
from .support import start_private_redis
from ..command_support import out
from ..display import rows_table

console = Console(stderr=True)


def start_worker(model: str, device: str, batch_size: int, broker: str, log_path: Path, *, shards_in_flight: int,
                 metrics_port: int, engine: str = "auto", max_memory: str | None = None) -> subprocess.Popen:
    log = open(log_path, "wb")
    command = [sys.executable, "-m", "shardgen.producer.cli", "worker", "--model", model, "--device", device,
               "--batch-size", str(batch_size), "--broker", broker, "--shards-in-flight", str(shards_in_flight),
               "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1", "--engine", engine,
               *(["--max-memory", max_memory] if max_memory else [])]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while b" ready." not in log_path.read_bytes():
        if process.poll() is not None or time.time() > deadline:
            raise click.ClickException(f"the worker did not start:\n{log_path.read_text(errors='replace')[-2000:]}")
        time.sleep(0.2)
    return process


def engine_counters(port: int) -> dict[str, float]:
    """The worker's engine counters from its /metrics (decode steps and tokens since it started)."""
    from urllib.request import urlopen

    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    wanted = ("shardgen_engine_decode_steps", "shardgen_engine_decode_tokens")
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            values[name] = float(value)
    return values


def occupancy(before: dict[str, float], after: dict[str, float], batch_size: int) -> float | None:
    """Share of the batch's slots that decoded over the run: decoded tokens / (decode steps x batch size)."""
    steps = after.get("shardgen_engine_decode_steps", 0) - before.get("shardgen_engine_decode_steps", 0)
    tokens = after.get("shardgen_engine_decode_tokens", 0) - before.get("shardgen_engine_decode_tokens", 0)
    return tokens / (steps * batch_size) if steps else None


def parse_numbers(value: str, name: str) -> list[int]:
    try:
        numbers = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 1:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of positive numbers", param_hint=name)
    return numbers


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
@click.option("--shard-size", "shard_sizes", default="32", show_default=True,
              help="Rows per shard; several comma-separated (e.g. 8,32,128) run the job once per size.")
@click.option("--shards-in-flight", "in_flight", default="1,2", show_default=True,
              help="Shards the worker holds at once; several comma-separated run one worker each (1 is one shard at "
              "a time: the batch empties at every shard end).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Batch size of both modes.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=64, show_default=True, help="New tokens per prompt.")
@click.option("--engine", default="auto", show_default=True,
              help="Generator of both modes: shardgen, vllm, hf-generate or auto (vLLM on CUDA when installed).")
@click.option("--max-memory", help="KV cache budget of both modes (e.g. 1GiB) [default: each engine's own].")
@click.option("--broker", help="Redis URL to use [default: start a private redis-server on a free port].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the prompts and of generation.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench_queue(model: str, device: str, rows: int, shard_sizes: str, in_flight: str, batch_size: int,
                max_new_tokens: int, engine: str, max_memory: str | None, broker: str | None, seed: int,
                as_json: bool) -> None:
    """Run one greedy job embedded and through Redis + one worker; report tokens/s, the ratio and the worker's
    batch occupancy, per shard size and per number of shards in flight.

    The worker is started and loaded before the clock starts, and the embedded time excludes model loading, so the
    ratio is what the queue (submit, messages, leases, Parquet, status) costs, and what shard ends cost the batch.
    """
    from transformers.utils import logging as hf_logging

    from .support import free_port

    sizes, flights = parse_numbers(shard_sizes, "--shard-size"), parse_numbers(in_flight, "--shards-in-flight")
    hf_logging.disable_progress_bar()
    scratch = Path(tempfile.mkdtemp(prefix="shardgen-bench-queue-"))
    redis_process = None
    results: list[dict[str, Any]] = []
    try:
        data = write_prompts(scratch / "prompts.jsonl", rows, seed)
        params = SamplingParams(max_new_tokens=max_new_tokens, seed=seed)

        def make_spec(size: int) -> RunSpec:
            # the run pins the engine the worker serves (schemas/model.py pinned_engine)
            return RunSpec(input=str(data), model=ModelSpec(model=model, engine=pinned_engine(engine)), params=params,
                           shard_size=size)

        if broker is None:
            redis_process, broker = start_private_redis(scratch)
        embedded = {}
        for size in sizes:
            console.print(f"embedded run, shards of {size} ...")
            embedded[size] = embedded_rate(make_spec(size), scratch / f"embedded-{size}.parquet", device, batch_size,
                                           engine, max_memory)
            embedded[size].update(shard_size=size, shards_in_flight=None, occupancy=None)
            results.append(embedded[size])
        for count in flights:
            console.print(f"starting one worker with {count} shard(s) in flight ...")
            port = free_port()
            worker = start_worker(model, device, batch_size, broker, scratch / f"worker-{count}.log",
                                  shards_in_flight=count, metrics_port=port, engine=engine, max_memory=max_memory)
            try:
                for size in sizes:
                    console.print(f"distributed run, shards of {size}, {count} in flight ...")
                    before = engine_counters(port)
                    result = distributed_rate(make_spec(size), scratch / f"work-{count}-{size}", broker)
                    result.update(shard_size=size, shards_in_flight=count,
                                  occupancy=occupancy(before, engine_counters(port), batch_size))
                    results.append(result)
            finally:
                worker.terminate()
                worker.wait(60)
    finally:
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait(30)
        shutil.rmtree(scratch, ignore_errors=True)
    for result in results:
        base = embedded[result["shard_size"]]
        result["tokens_per_s"] = result["tokens"] / result["seconds"] if result["seconds"] > 0 else 0.0
        base_rate = base["tokens"] / base["seconds"] if base["seconds"] > 0 else 0.0
        result["ratio_to_embedded"] = result["tokens_per_s"] / base_rate if base_rate else 0.0
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    out.print(rows_table(
        f"queue overhead: {rows} rows, batch {batch_size}, {max_new_tokens} new tokens, {device}, engine {engine}",
        ["mode", "shard size", "in flight", "rows", "tokens", "seconds", "tokens/s", "vs embedded", "occupancy"],
        [(r["mode"], r["shard_size"], r["shards_in_flight"] or "-", r["rows"], r["tokens"], f"{r['seconds']:.1f}",
          f"{r['tokens_per_s']:.1f}", f"{r['ratio_to_embedded']:.2f}x",
          "-" if r["occupancy"] is None else f"{r['occupancy']:.2f}") for r in results],
    ))
