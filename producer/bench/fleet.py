"""`shardgen bench fleet`: what the control plane costs per shard, with many workers on one Redis.

The workers are real `shardgen worker` processes (Celery solo pool, the claim/complete scripts, the staged input
read, the Parquet result write and its publication, the watchdog), started with `--engine` naming the generator
below, as a user names a generator of their own: a control-plane load that answers every prompt at once with an
empty text, so the throughput measured is the queue's, not a model's. The runs go through the real `submit` path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import click
from rich.console import Console

from .support import start_private_redis
from ..command_support import out
from ..display import rows_table

console = Console(stderr=True)
LOAD_MODEL = "control-plane-load"


class ControlPlaneLoad:
    """A generator that does no model work: every request finishes at once with an empty sample."""

    name = "control-plane load generator"

    def __init__(self) -> None:
        self.batch_size = 1

    def generate(self, requests: Sequence[Any], params: Any, *, on_output: Callable | None = None,
                 should_stop: Callable[[], bool] | None = None) -> list[Any]:
        from shardgen.workers.generation import FINISH_LENGTH, GenerationOutput, Sample

        outputs = []
        for index, request in enumerate(requests):
            output = GenerationOutput([Sample("", [], FINISH_LENGTH)], len(request.prompt_ids))
            outputs.append(output)
            if on_output:
                on_output(index, output)
        return outputs


class _CharacterTokenizer:
    """What process_shard needs of a tokenizer, without loading one: one id per character, no chat template."""

    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 50_000 for c in text]}


def control_plane_load(spec: Any, runtime: Any) -> tuple[Any, Any]:
    """The `--engine` factory of the load workers: no model, a character tokenizer, a generator that does nothing."""
    from shardgen.workers.models.loader import LoadedModel

    loaded = LoadedModel(model=None, tokenizer=_CharacterTokenizer(), spec=spec, device=runtime.device, source=LOAD_MODEL,
                         context_length=1_000_000)
    return loaded, ControlPlaneLoad()


ENGINE = f"{__name__}:control_plane_load"


def run_fleet(workers: int, shards: int, scratch: Path) -> dict[str, Any]:
    from shardgen.schemas.model import ModelSpec
    from shardgen.schemas.run import RunSpec
    from shardgen.workers.lifecycle import RunStore

    from ..submit import submit_run

    server, url = start_private_redis(scratch)
    processes = []
    try:
        data = scratch / "prompts.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(shards)))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for slot in range(workers):
            command = [sys.executable, "-m", "shardgen.producer.cli", "worker", "--model", LOAD_MODEL, "--engine", ENGINE,
                       "--device", "cpu", "--broker", url, "--loglevel", "WARNING", "--grace-seconds", "5",
                       "--name", f"shardgen-load-{slot}@%h"]
            processes.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                                              stderr=open(scratch / f"worker-{slot}.log", "wb")))
        store = RunStore(url)
        deadline = time.time() + 300
        while len(store.workers()) < workers:
            if time.time() > deadline or any(p.poll() is not None for p in processes):
                raise click.ClickException(f"the load workers did not start: see {scratch}")
            time.sleep(0.2)
        spec = RunSpec(input=str(data), model=ModelSpec(model=LOAD_MODEL), shard_size=1)
        pids = [p.pid for p in processes] + [server.pid]
        cpu_before = [_cpu_seconds(pid) for pid in pids]
        submit_run(spec, str(scratch / "work"), store, Console(stderr=True, quiet=True))
        while not (record := store.record(spec.run_id, details=False)).finished:
            if time.time() > deadline + 600:
                raise click.ClickException("the run did not finish in 10 minutes")
            time.sleep(0.1)
        cpu = [after - before for before, after in zip(cpu_before, (_cpu_seconds(pid) for pid in pids))]
        elapsed = record.finished_at - record.started_at
        in_shard = sum(s.seconds for s in store.shards(spec.run_id))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        server.terminate()
        server.wait(30)
    return {
        "workers": workers, "shards": shards, "seconds": elapsed, "shards_per_s": shards / elapsed,
        "cpu_per_shard_ms": sum(cpu) / shards * 1000, "redis_cpu_per_shard_ms": cpu[-1] / shards * 1000,
        "wall_per_shard_ms": workers * elapsed / shards * 1000, "process_shard_ms": in_shard / shards * 1000,
        "state": record.state.value,
    }


def _cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@click.command("fleet")
@click.option("--workers", "worker_counts", default="1,16", show_default=True,
              help="Comma-separated numbers of worker processes; each runs the same job on a fresh Redis.")
@click.option("--shards", type=click.IntRange(min=1), default=2000, show_default=True, help="Shards in the job (one row each).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench_fleet(worker_counts: str, shards: int, as_json: bool) -> None:
    """Run a job of one-row shards through N real worker processes whose generator does no model work, and
    report shards/s and the per-shard overhead: the CPU every worker process and Redis spend per shard (what
    bounds shards/s when workers outnumber cores), the wall time a worker spends per shard (N x elapsed /
    shards), and the part of it inside process_shard (reading the staged input, writing the result)."""
    results = []
    for count in [int(c) for c in worker_counts.split(",") if c.strip()]:
        scratch = Path(tempfile.mkdtemp(prefix="shardgen-bench-fleet-"))
        try:
            console.print(f"{count} worker(s), {shards} shards ...")
            results.append(run_fleet(count, shards, scratch))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    base = results[0]["shards_per_s"] if results else 0
    for result in results:
        result["vs_first"] = result["shards_per_s"] / base if base else 0
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    out.print(rows_table(
        f"control plane: {shards} one-row shards, one Redis, a generator that does no model work",
        ["workers", "shards/s", "vs first", "CPU ms/shard", "of it Redis", "wall ms/shard", "in process_shard", "seconds"],
        [(r["workers"], f"{r['shards_per_s']:.0f}", f"{r['vs_first']:.2f}x", f"{r['cpu_per_shard_ms']:.1f}",
          f"{r['redis_cpu_per_shard_ms']:.2f}", f"{r['wall_per_shard_ms']:.1f}", f"{r['process_shard_ms']:.1f}",
          f"{r['seconds']:.1f}") for r in results],
    ))
