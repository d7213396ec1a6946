"""`shardgen bench submit`: what submitting a large dataset costs: submit rows/s, what Redis holds per row and
per shard, and how long `status --json` takes, each measured the way a user meets it (the real commands, a
fresh private redis-server per size)."""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from .support import start_private_redis
from ..command_support import out
from ..display import rows_table

console = Console(stderr=True)

SUBJECTS = ["the river", "a lighthouse", "the old library", "a mountain village", "the harbour", "a desert road",
            "the night market", "a glacier", "the train station", "an orchard"]
QUESTIONS = ["Describe {s} at dawn in two sentences.", "Write a short poem about {s}.",
             "What would a child notice first about {s}?", "Give three facts a tourist should know about {s}.",
             "Explain why {s} matters to the people who live near it."]


def write_short_prompts(path: Path, rows: int, seed: int = 0) -> int:
    """`rows` short prompts, about 180 bytes a JSONL line (17 MiB per 100k rows); returns the file's bytes."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(rows):
            prompt = rng.choice(QUESTIONS).format(s=rng.choice(SUBJECTS)) + " Keep it short, simple and friendly: under fifty words, please."
            handle.write(json.dumps({"id": f"row-{i:07d}", "prompt": prompt, "topic": rng.choice(SUBJECTS)}) + "\n")
    return path.stat().st_size


def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "shardgen.producer.cli", *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise click.ClickException(f"shardgen {args[0]} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - started, result


def measure(rows: int, shard_size: int, scratch: Path, repeats: int) -> dict[str, Any]:
    import redis

    data = scratch / f"prompts-{rows}.jsonl"
    dataset_bytes = write_short_prompts(data, rows)
    server, url = start_private_redis(scratch)
    try:
        client = redis.Redis.from_url(url)
        before = client.info("memory")["used_memory"]
        _start_slowlog(client)
        seconds, submitted = _cli("submit", str(data), "--work-dir", str(scratch / "work"), "--broker", url,
                                  "--shard-size", str(shard_size), "--model", "bench-model")
        longest = {"submit": _longest_command(client)}
        run_id = submitted.stdout.strip().splitlines()[-1]
        growth = client.info("memory")["used_memory"] - before
        shards = -(-rows // shard_size)
        status_cli = [_cli("status", run_id, "--json", "--broker", url)[0] for _ in range(repeats)]
        longest["status"] = _longest_command(client)
        status_call = _status_in_process(run_id, url, repeats * 4)
        _start_slowlog(client)
        cancel_s = _cli("cancel", run_id, "--broker", url)[0]
        longest["cancel"] = _longest_command(client)
        retry_s = _cli("retry", run_id, "--broker", url)[0]
        longest["retry"] = _longest_command(client)
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(scratch / "work", ignore_errors=True)
        data.unlink()
    return {
        "rows": rows, "shards": shards, "dataset_mib": dataset_bytes / 2**20, "submit_s": seconds,
        "rows_per_s": rows / seconds, "redis_growth_mib": growth / 2**20, "redis_share": growth / dataset_bytes,
        "redis_bytes_per_row": growth / rows, "redis_bytes_per_shard": growth / shards,
        "status_cli_ms": statistics.median(status_cli) * 1000, "status_call_ms": status_call * 1000,
        "cancel_s": cancel_s, "retry_s": retry_s, "longest_command": longest,
    }


def _start_slowlog(client: Any) -> None:
    """Log every command with its time from here on (SLOWLOG: how long Redis itself was held, not the round trip)."""
    client.config_set("slowlog-log-slower-than", 0)
    client.config_set("slowlog-max-len", 1_000_000)
    client.slowlog_reset()


def _longest_command(client: Any) -> dict[str, Any]:
    """The longest command Redis ran since the last call (the bench's own SLOWLOG reads left out), then reset."""
    entries = [e for e in client.slowlog_get(1_000_000) if not _command_name(e).startswith(("SLOWLOG", "CONFIG"))]
    client.slowlog_reset()
    if not entries:
        return {"ms": 0.0, "command": "-", "commands": 0}
    slowest = max(entries, key=lambda e: e["duration"])
    return {"ms": slowest["duration"] / 1000, "command": _command_name(slowest)[:60], "commands": len(entries)}


def _command_name(entry: dict[str, Any]) -> str:
    command = entry.get("command", b"")
    text = command.decode(errors="replace") if isinstance(command, bytes) else str(command)
    return text.split(" ")[0].upper() + (" " + text.split(" ")[2][:12] if text.upper().startswith("EVALSHA") else "")


def _status_in_process(run_id: str, url: str, repeats: int) -> float:
    """Median time of what `status --json` does once its process has started: read the run, compute status."""
    from shardgen.workers.lifecycle import RunStore, run_status

    store = RunStore(url)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        record = store.record(run_id)
        json.dumps(run_status(record, store.now(), queue_depth=store.queue_depth(record.queue), workers=store.workers()))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@click.command("submit")
@click.option("--rows", default="100000,1000000", show_default=True, help="Comma-separated dataset sizes (short prompts).")
@click.option("--shard-size", type=click.IntRange(min=1), default=64, show_default=True, help="Rows per shard.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="`status --json` calls timed per size.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def bench_submit(rows: str, shard_size: int, repeats: int, as_json: bool) -> None:
    """Submit datasets of short prompts to a private redis-server (no workers) and report submit rows/s,
    Redis memory per row and per shard (as a share of the dataset's bytes), and `status --json` latency:
    the whole command as a user runs it, and the store read it makes once started."""
    sizes = [int(size) for size in rows.split(",") if size.strip()]
    results = []
    for size in sizes:
        scratch = Path(tempfile.mkdtemp(prefix="shardgen-bench-submit-"))
        try:
            console.print(f"submitting {size:,} rows ...")
            results.append(measure(size, shard_size, scratch, repeats))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    out.print(rows_table(
        f"submit and status, shards of {shard_size} rows, a private redis-server, no workers",
        ["rows", "MiB", "submit s", "rows/s", "Redis MiB", "Redis %", "B/row", "B/shard", "status ms", "read ms"],
        [(f"{r['rows']:,}", f"{r['dataset_mib']:.1f}", f"{r['submit_s']:.1f}", f"{r['rows_per_s']:,.0f}",
          f"{r['redis_growth_mib']:.2f}", f"{r['redis_share']:.2%}", f"{r['redis_bytes_per_row']:.1f}",
          f"{r['redis_bytes_per_shard']:.0f}", f"{r['status_cli_ms']:.0f}", f"{r['status_call_ms']:.1f}")
         for r in results],
        no_wrap=("rows", "rows/s"),
    ))
    out.print(rows_table(
        "the longest single Redis command of each step (SLOWLOG: how long Redis was held by one command)",
        ["rows", "shards", "submit ms", "status ms", "cancel ms", "retry ms", "cancel s", "retry s"],
        [(f"{r['rows']:,}", f"{r['shards']:,}",
          *(f"{r['longest_command'][step]['ms']:.2f} ({r['longest_command'][step]['command'].split(' ')[0]})"
            for step in ("submit", "status", "cancel", "retry")),
          f"{r['cancel_s']:.1f}", f"{r['retry_s']:.1f}") for r in results],
        no_wrap=("rows", "shards"),
    ))
    console.print("Redis %: Redis memory growth as a share of the dataset's bytes; status ms: the whole "
                  "`status --json` command; read ms: its store read once started; cancel s, retry s: the whole "
                  "commands, in steps of a few thousand shards.")
