"""The `shardgen` command: run, submit, worker, status, collect."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click
from rich.console import Console
from rich.live import Live

from shardgen.schemas.errors import BrokerError, ShardgenError
from shardgen.schemas.model import DTYPES, QUANTIZE_METHODS
from shardgen.workers.redis_conn import BROKER_ENV, DEFAULT_BROKER_URL

from . import config as config_mod
from .command_support import console, one_line_errors, quiet_libraries

out = Console()


# ---------------------------------------------------------------- shared options
def _options(*decorators: Callable) -> Callable:
    def apply(func: Callable) -> Callable:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


config_option = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), help="TOML file with any of these options; flags override it."
)
broker_option = click.option(
    "--broker", envvar=BROKER_ENV, show_envvar=True, help=f"Redis URL of the broker and run state [default: {DEFAULT_BROKER_URL}]."
)
hf_token_option = click.option(
    "--hf-token", envvar="HF_TOKEN", show_envvar=True, help="Hugging Face token for private hub models (never printed)."
)

model_options = _options(
    click.option("--model", help="Model: alias (smollm2-135m, the default), checkpoint directory, or hub id."),
    click.option(
        "--quantize",
        type=click.Choice(QUANTIZE_METHODS),
        help="nf4, fp4, int8: bitsandbytes at load; gptq, awq: a checkpoint quantized that way; "
        "none: load the checkpoint as it is [default: none].",
    ),
    click.option(
        "--quantization-config",
        help='Quantization fields as JSON, e.g. \'{"load_in_4bit": true, "bnb_4bit_use_double_quant": true}\' '
        'or \'{"bits": 4, "dataset": "calib.jsonl"}\' (or a [quantization_config] table in --config).',
    ),
    click.option("--dtype", type=click.Choice(DTYPES), help="Weights dtype [default: auto: float32 on CPU, bfloat16 on CUDA]."),
    click.option("--revision", help="Hub revision (branch, tag or commit) of the model."),
    click.option("--trust-remote-code", is_flag=True, default=None, help="Allow the model's own Python code to run (off unless given)."),
)

input_options = _options(
    click.argument("input_path", metavar="INPUT", required=False),
    click.option("--split", help="Dataset split for hub datasets and saved DatasetDicts [default: train]."),
    click.option("--limit", type=int, help="Use only the first N rows."),
    click.option("--prompt-column", help="Column of plain-text prompts [default: prompt, question, instruction, input or text]."),
    click.option("--messages-column", help="Column of chat message lists instead of a prompt column."),
    click.option("--system-prompt", help="System prompt for every row."),
    click.option("--system-column", help="Column of per-row system prompts (overrides --system-prompt)."),
    click.option("--id-column", help="Column of row ids [default: the row index]."),
    click.option("--keep-columns", help="Comma-separated input columns to copy into the output."),
    click.option("--output-column", help="Name of the generated-text column [default: generation]."),
    click.option("--ground-truth-column", help="Column with a reference answer, carried through as `ground_truth`."),
    click.option("--chat-template/--no-chat-template", default=None, help="Apply the model's chat template [default: on]."),
    click.option("--max-prompt-tokens", type=int, help="Truncate longer prompts from the left (recorded per row)."),
    click.option("--shard-size", type=int, help="Rows per shard [default: 64]."),
)

generation_options = _options(
    click.option("--max-new-tokens", type=int, help="Most new tokens per sample [default: 256]."),
    click.option("--max-length", type=int, help="Cap on prompt + new tokens, as in transformers."),
    click.option("--temperature", type=float, help="Sampling temperature; 0 is greedy [default: 0]."),
    click.option("--top-p", type=float, help="Nucleus sampling threshold in (0, 1] [default: 1]."),
    click.option("--top-k", type=int, help="Keep the k most likely tokens; 0 is off [default: 0]."),
    click.option("--min-p", type=float, help="Drop tokens below min_p x the top probability [default: 0]."),
    click.option("--repetition-penalty", type=float, help="Penalty for tokens already seen; 1 is off [default: 1]."),
    click.option("--stop", multiple=True, help="Stop string (repeatable); the text is cut before it."),
    click.option("-n", "--n", "--num-return-sequences", "n", type=int, help="Samples per prompt [default: 1]."),
    click.option("--seed", type=int, help="Base seed; every row derives its own, so results repeat [default: random, recorded]."),
    click.option("--num-beams", type=int, help="Beam search width; 1 is off [default: 1]."),
    click.option("--length-penalty", type=float, help="Beam search length penalty [default: 1]."),
    click.option("--early-stopping/--no-early-stopping", default=None, help="Beam search early stopping."),
)

runtime_options = _options(
    click.option("--device", help="cpu, cuda or cuda:N [default: auto]."),
    click.option("--batch-size", type=int, help="Sequences decoded together [default: 16]."),
)


def _collect_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Flags given on the command line, under canonical option names, merged over the --config file."""
    file_options = config_mod.load_config(kwargs.pop("config_path", None))
    flags = dict(kwargs)
    if flags.get("input_path") is not None:
        flags["input"] = flags.pop("input_path")
    else:
        flags.pop("input_path", None)
    if flags.get("keep_columns"):
        flags["keep_columns"] = tuple(c.strip() for c in flags["keep_columns"].split(",") if c.strip())
    return config_mod.merge(file_options, flags)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="shardgen")
def cli() -> None:
    """shardgen: run a language model over a whole dataset.

    \b
    Embedded, one process, no services:
      shardgen run prompts.jsonl -o results.parquet
    Distributed, Redis + Celery workers on GPU nodes:
      shardgen submit prompts.jsonl --work-dir /shared/runs   (prints RUN_ID)
      shardgen worker --device cuda:0                          (one per GPU, any host)
      shardgen status RUN_ID --watch
      shardgen collect RUN_ID -o results.parquet
    """


# ---------------------------------------------------------------- run
@cli.command()
@input_options
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Result file; .parquet or .jsonl chooses the format.")
@model_options
@hf_token_option
@generation_options
@runtime_options
@click.option("--compile", is_flag=True, default=None, help="torch.compile the decode step where it helps.")
@click.option("--show", type=int, default=5, show_default=True, help="Result rows to show in the closing table (0: none).")
@config_option
@one_line_errors
def run(show: int, **kwargs: Any) -> None:
    """Generate for every row of INPUT in this process (no Redis, no workers) and write OUTPUT.

    INPUT is a .jsonl/.json/.csv/.parquet file, a save_to_disk directory or a hub dataset name.
    An interrupted run resumes from OUTPUT.parts when started again with the same settings.
    """
    quiet_libraries()
    from .embedded import run_embedded

    options = _collect_options(kwargs)
    if not options.get("output"):
        raise ShardgenError("no output file given", "pass -o results.parquet (or .jsonl)")
    spec = config_mod.build_run_spec(options)
    summary = run_embedded(
        spec,
        Path(options["output"]),
        device=options.get("device") or "auto",
        batch_size=_positive(options.get("batch_size", 16), "batch_size"),
        hf_token=options.get("hf_token"),
        compile=bool(options.get("compile")),
        console=console,
    )
    from .display import human_bytes, human_duration, key_value_table

    if show > 0:
        _show_results(Path(options["output"]), spec.columns.output_column, show)
    out.print(
        key_value_table(
            "summary",
            [
                ("output", summary.report.output),
                ("rows", f"{summary.rows:,}"),
                ("rows failed", f"{summary.rows_failed:,}"),
                ("prompt tokens", f"{summary.prompt_tokens:,}"),
                ("generated tokens", f"{summary.generated_tokens:,}"),
                ("time", human_duration(summary.seconds)),
                ("tokens/s", f"{summary.tokens_per_second:,.1f}"),
                ("peak memory", human_bytes(summary.peak_memory_bytes)),
            ]
            + ([("resumed shards", summary.resumed_shards)] if summary.resumed_shards else []),
        )
    )
    if summary.rows_failed:
        console.print(f"[yellow]{summary.rows_failed} row(s) failed; their errors are in the `error` column")


def _show_results(path: Path, output_column: str, limit: int) -> None:
    import pyarrow.parquet as pq

    from .display import rows_table

    if path.suffix == ".parquet":
        table = pq.read_table(path).slice(0, limit).to_pylist()
    else:
        with open(path, encoding="utf-8") as handle:
            table = [json.loads(line) for _, line in zip(range(limit), handle)]
    with_truth = any(r.get("ground_truth") is not None for r in table)
    columns = ["id", output_column, *(["ground truth"] if with_truth else []), "finish", "tokens"]
    out.print(
        rows_table(
            f"first {len(table)} results",
            columns,
            [
                (
                    r["id"],
                    r[output_column] if r.get("error") is None else f"error: {r['error']}",
                    *([r.get("ground_truth")] if with_truth else []),
                    r["finish_reason"],
                    r["generated_tokens"],
                )
                for r in table
            ],
        )
    )


def _positive(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ShardgenError(f"{name} must be a positive integer, got {value!r}")
    return value


# ---------------------------------------------------------------- submit
@cli.command()
@input_options
@click.option("--work-dir", type=click.Path(file_okay=False), help="Where workers write result shards (DIR/RUN_ID/); shared by all hosts.")
@model_options
@generation_options
@click.option("--max-retries", type=int, help="Retries of a failing shard before it is marked failed [default: 3].")
@broker_option
@click.option("--resume", "resume_id", metavar="RUN_ID", help="Redo only the shards of RUN_ID without a complete result (same settings required).")
@click.option("--json", "as_json", is_flag=True, help="Print the run record as JSON instead of the run id.")
@config_option
@one_line_errors
def submit(as_json: bool, resume_id: str | None, **kwargs: Any) -> None:
    """Shard INPUT into generation jobs on Redis for `shardgen worker` processes; print the run id.

    Shards carry their rows in the message, so workers need no access to INPUT; they do need to write
    to --work-dir (a shared filesystem).
    """
    quiet_libraries()
    from shardgen.workers.redis_conn import broker_url
    from shardgen.workers.lifecycle.store import RunStore

    from .status import status_dict
    from .submit import submit_run

    options = _collect_options(kwargs)
    if not options.get("work_dir"):
        raise ShardgenError("no work directory given", "pass --work-dir DIR, a directory every worker can write")
    spec = config_mod.build_run_spec(options)
    url = broker_url(options.get("broker"))
    store = RunStore(url)
    if resume_id:
        spec = _resume(store, url, resume_id, spec, Path(options["work_dir"]))
    else:
        submit_run(spec, Path(options["work_dir"]), store, url, console)
    if as_json:
        out.print_json(json.dumps({**status_dict(store.record(spec.run_id)), "spec": spec.to_dict()}))
    else:
        out.print(spec.run_id, highlight=False)
        console.print(f"queued on {spec.model.queue}; start workers with `shardgen worker --model {spec.model.model}" + (f" --quantize {spec.model.quantize}`" if spec.model.quantize != "none" else "`"))


def _resume(store: Any, url: str, run_id: str, spec: Any, work_dir: Path) -> Any:
    from .submit import requeue, shards_to_redo

    record = store.record(run_id)
    difference = record.spec.difference(spec)
    if difference:
        raise ShardgenError(f"cannot resume run {run_id} with a different {difference}", "resume with the original settings, or submit a new run")
    if Path(record.work_dir).resolve() != work_dir.expanduser().resolve():
        raise ShardgenError(f"run {run_id} writes to {record.work_dir}, not {work_dir}", f"pass --work-dir {record.work_dir}")
    redo = shards_to_redo(record)
    requeue(store, url, record, redo)
    console.print(f"resuming run {run_id}: {len(redo)} of {record.shards_total} shard(s) queued again")
    return record.spec


@cli.command()
@click.argument("run_id")
@broker_option
@one_line_errors
def retry(run_id: str, broker: str | None) -> None:
    """Queue RUN_ID's failed, cancelled, lost and missing shards again (rows come from Redis)."""
    from shardgen.workers.redis_conn import broker_url
    from shardgen.workers.lifecycle.store import RunStore

    from .submit import requeue, shards_to_redo

    url = broker_url(broker)
    store = RunStore(url)
    record = store.record(run_id)
    redo = shards_to_redo(record)
    if not redo:
        console.print(f"run {run_id} has nothing to retry: every shard is done or running")
        return
    requeue(store, url, record, redo)
    console.print(f"queued {len(redo)} shard(s) of run {run_id} again: {redo[:20]}{' ...' if len(redo) > 20 else ''}")


@cli.command()
@click.argument("run_id")
@broker_option
@one_line_errors
def cancel(run_id: str, broker: str | None) -> None:
    """Stop RUN_ID: queued shards are dropped, running ones stop at their next step. `retry` resumes it."""
    from shardgen.workers.redis_conn import broker_url
    from shardgen.workers.lifecycle.store import RunStore

    store = RunStore(broker_url(broker))
    if not store.cancel(run_id):
        raise ShardgenError(f"run {run_id} has already ended ({store.record(run_id, with_shards=False).state})", "nothing to cancel")
    console.print(f"run {run_id} cancelled")


# ---------------------------------------------------------------- worker
@cli.command()
@model_options
@hf_token_option
@runtime_options
@click.option("--compile", is_flag=True, default=None, help="torch.compile the decode step where it helps.")
@broker_option
@click.option("--loglevel", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]))
@click.option("--name", "node_name", help="Worker node name [default: shardgen-MODEL-DEVICE@HOST].")
@config_option
@one_line_errors
def worker(loglevel: str, node_name: str | None, **kwargs: Any) -> None:
    """Serve one model on one device: load it once, then process shards from its queue until stopped.

    Start one per GPU (`--device cuda:0`, `cuda:1`, ...) on any host that reaches the broker.
    Runs only reach workers started with the same --model and --quantize.
    """
    quiet_libraries()
    from shardgen.workers.queue.worker_main import start_worker

    options = _collect_options(kwargs)
    start_worker(
        config_mod.build_model_spec(options),
        device=options.get("device") or "auto",
        batch_size=_positive(options.get("batch_size", 16), "batch_size"),
        broker=options.get("broker"),
        hf_token=options.get("hf_token"),
        compile=bool(options.get("compile")),
        loglevel=loglevel,
        node_name=node_name,
        console=console,
    )


# ---------------------------------------------------------------- status
@cli.command()
@click.argument("run_id", required=False)
@broker_option
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable record (state, rows_total, rows_done, ...).")
@click.option("--watch", is_flag=True, help="Refresh until the run ends.")
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds between refreshes with --watch.")
@one_line_errors
def status(run_id: str | None, broker: str | None, as_json: bool, watch: bool, interval: float) -> None:
    """Show a run's shards (queued/running/done/failed), rows, tokens/s, ETA and workers.

    Without RUN_ID, list recent runs. Exit code with --watch: 0 when the run is done, 1 when it failed
    or was cancelled.
    """
    from shardgen.workers.redis_conn import broker_url
    from shardgen.workers.lifecycle.store import RunStore

    from .status import runs_table, status_dict, status_view

    store = RunStore(broker_url(broker))
    if run_id is None:
        records = [store.record(r, with_shards=False) for r in store.run_ids()]
        if as_json:
            out.print_json(json.dumps([{"run_id": r.run_id, "state": r.state, "rows_total": r.rows_total, "rows_done": r.rows_done} for r in records]))
        else:
            out.print(runs_table(records))
        return
    record = store.record(run_id)
    if as_json and not watch:
        out.print_json(json.dumps(status_dict(record)))
        return
    if not watch:
        out.print(status_view(status_dict(record)))
        return
    with Live(status_view(status_dict(record)), console=out, refresh_per_second=4) as live:
        unreachable_since: float | None = None
        while not record.finished:
            time.sleep(interval)
            try:
                record = store.record(run_id)
                unreachable_since = None
            except Exception as exc:  # Redis restarting: keep watching for a while before giving up
                unreachable_since = unreachable_since or time.time()
                if time.time() - unreachable_since > 120:
                    raise BrokerError(f"lost Redis for 2 minutes while watching run {run_id}: {exc}", "check the broker and watch again") from None
                continue
            live.update(status_view(status_dict(record)))
    if as_json:
        out.print_json(json.dumps(status_dict(record)))
    sys.exit(0 if record.state == "done" else 1)


# ---------------------------------------------------------------- collect
@cli.command()
@click.argument("run_id")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Merged result; .parquet or .jsonl.")
@click.option("--work-dir", type=click.Path(file_okay=False), help="Work directory of the run [default: the one recorded at submit].")
@click.option("--allow-partial", is_flag=True, help="Write what is there even if rows are missing or failed (exit 0).")
@broker_option
@one_line_errors
def collect(run_id: str, output: str, work_dir: str | None, allow_partial: bool, broker: str | None) -> None:
    """Merge RUN_ID's result shards into one file in input order, checking every row appears once.

    Missing or failed rows are listed and make the exit code non-zero unless --allow-partial.
    With --work-dir the run is read from DIR/RUN_ID/run.json and Redis is not needed.
    """
    from shardgen.schemas.errors import RunNotFound
    from shardgen.schemas.shard import check_run_id

    from .collect import collect as collect_run
    from .collect import read_run_file
    from .display import rows_table

    check_run_id(run_id)
    if work_dir is None:
        from shardgen.workers.redis_conn import broker_url
        from shardgen.workers.lifecycle.store import RunStore

        work_dir = RunStore(broker_url(broker)).record(run_id, with_shards=False).work_dir
    recorded = read_run_file(Path(work_dir) / run_id)
    if recorded is None:
        raise RunNotFound(f"no run {run_id} in {work_dir}", "check the run id and --work-dir")
    spec, rows_total, shards_total = recorded
    report = collect_run(Path(work_dir) / run_id, spec, rows_total, shards_total, Path(output), allow_partial=allow_partial)
    if report.failed_rows:
        out.print(rows_table("failed rows", ["row", "id", "error"], [(r["row_index"], r["id"], r["error"]) for r in report.failed_rows[:50]]))
    if report.missing_rows:
        console.print(f"[red]{len(report.missing_rows)} row(s) missing (shards {report.missing_shards[:20]})")
    if report.written:
        console.print(f"wrote {report.rows_written:,} of {rows_total:,} rows to {report.output}")
    if not report.complete and not allow_partial:
        from shardgen.schemas.errors import IncompleteRun

        raise IncompleteRun(
            f"run {run_id} is incomplete: {len(report.missing_rows)} row(s) missing, {len(report.failed_rows)} failed",
            f"nothing written; retry with `shardgen retry {run_id}`, or write what is there with --allow-partial",
        )


def _register_more_commands() -> None:
    from .bench import bench
    from .bench_quant import bench_quant
    from .bench_queue import bench_queue
    from .quantize import quantize

    for command in (bench, bench_quant, bench_queue, quantize):
        cli.add_command(command)


_register_more_commands()


def main() -> None:
    cli(prog_name="shardgen")


if __name__ == "__main__":
    main()
