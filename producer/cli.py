"""The `shardgen` command: run, submit, worker, status, collect."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

import click

from shardgen.schemas.errors import BrokerError, ShardgenError
from shardgen.schemas.model import DTYPES, PINNED_ENGINES, QUANTIZE_METHODS, pinned_engine
from shardgen.schemas.runtime import DEFAULT_GRACE_SECONDS, DEFAULT_SHARDS_IN_FLIGHT, DEFAULT_STALL_SECONDS

from shardgen.workers import BROKER_ENV, DEFAULT_BROKER_URL, SENTINEL_MASTER_ENV

from . import config as config_mod
from .command_support import check_output_target, console, one_line_errors, out, print_json, quiet_libraries
from .score import METRICS as SCORE_METRICS


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
def _sentinel_master(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:  # the environment carries it to every child process (workers, the supervisor's children)
        os.environ[SENTINEL_MASTER_ENV] = value


def broker_option(command: Callable[..., Any]) -> Callable[..., Any]:
    command = click.option(
        "--sentinel-master", expose_value=False, callback=_sentinel_master, envvar=SENTINEL_MASTER_ENV,
        show_envvar=True, help="With a sentinel:// broker: the name of the master its Sentinels watch.",
    )(command)
    return click.option(
        "--broker", envvar=BROKER_ENV, show_envvar=True,
        help=f"Redis URL of the broker and run state, or sentinel://host:port;sentinel://host:port for a Redis "
        f"watched by Sentinels [default: {DEFAULT_BROKER_URL}].",
    )(command)
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
    click.option("--dtype", type=click.Choice(DTYPES),
                 help="Weights dtype [default: auto: bfloat16 on CUDA, float32 on a CPU]. On a CPU, bfloat16 packs "
                 "the engine's linear layers in bfloat16 (AVX-512 BF16 or AMX) and int8 in int8 (VNNI); both are "
                 "faster and drift from float32's text. The choice is logged and recorded in each result file."),
    click.option("--model-revision", help="Hub revision (branch, tag or commit) of the model."),
    click.option("--trust-remote-code", is_flag=True, default=None, help="Allow the model's own Python code to run (off unless given)."),
)

input_options = _options(
    click.argument("input_path", metavar="INPUT", required=False),
    click.option("--split", help="Dataset split for hub datasets and saved DatasetDicts [default: train]."),
    click.option("--subset", help="Hub dataset subset, also called config (e.g. main for openai/gsm8k)."),
    click.option("--revision", help="Hub dataset revision: branch, tag or commit."),
    click.option("--limit", type=int, help="Use only the first N rows."),
    click.option("--prompt-column", help="Column of plain-text prompts [default: prompt, question, instruction, input or text]."),
    click.option("--messages-column", help="Column of chat message lists instead of a prompt column."),
    click.option("--system-prompt", help="System prompt for every row."),
    click.option("--system-column", help="Column of per-row system prompts (overrides --system-prompt)."),
    click.option("--id-column", help="Column of row ids [default: the row index]."),
    click.option("--keep-columns", help="Comma-separated input columns to copy into the output."),
    click.option("--output-column", help="Name of the generated-text column [default: generation]."),
    click.option("--ground-truth-column", help="Column with a reference answer, carried through as `ground_truth`."),
    click.option("--params-column", help="Column of per-row requests: JSON objects of generation parameters (e.g. "
                 '{"temperature": 0.7, "json_schema": {...}}) over the run\'s; a row whose fields are invalid fails alone.'),
    click.option("--adapter-column", help="Column of per-row LoRA adapter directories, served over one loaded base "
                 "(--engine vllm); an empty cell means the base model."),
    click.option("--chat-template/--no-chat-template", default=None, help="Apply the model's chat template [default: on]."),
    click.option("--max-prompt-tokens", type=int, help="Truncate longer prompts from the left (recorded per row)."),
    click.option("--shard-size", type=int, help="Rows per shard [default: 64]."),
    click.option("--input-format", type=click.Choice(["auto", "rows", "openai-batch"]),
                 help="rows: a dataset of prompts; openai-batch: an OpenAI Batch API input file (custom_id, url, body), "
                 "one request per line with its own parameters [default: auto: openai-batch for a .jsonl of that shape]."),
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
    click.option("--logprobs", type=int, help="Record each generated token's logprob and its K most likely alternatives "
                 "(a `logprobs` column; 0 records only the chosen token's) [default: off]."),
    click.option("--json-schema", metavar="FILE_OR_JSON", help="Constrain every text to a JSON Schema (a .json file "
                 "or the schema itself); the output gains a `parsed` column, each text's JSON value."),
    click.option("--regex", help="Constrain every text to match this regular expression, whole."),
    click.option("--choice", help="Constrain every text to exactly one of these comma-separated strings."),
    click.option("--length-penalty", type=float, help="Beam search length penalty [default: 1]."),
    click.option("--early-stopping/--no-early-stopping", default=None, help="Beam search early stopping."),
)

storage_option = click.option(
    "--storage-options",
    help='fsspec options for s3://, gs://, hf:// locations as JSON, e.g. \'{"endpoint_url": "http://minio:9000"}\' '
    "(or a [storage_options] table in --config; workers also read SHARDGEN_STORAGE_OPTIONS). The AWS_* variables "
    "and AWS_ENDPOINT_URL work as usual. Never printed or stored with the run.",
)

result_options = _options(
    click.option("--score", "score", is_flag=True, help="Score each answer against the ground truth (a `score` column) "
                 "and print the mean of each metric."),
    click.option("--metric", "metrics", multiple=True, type=click.Choice(SCORE_METRICS),
                 help="With --score: a metric to compute (repeat for several) [default: all]."),
    click.option("--row-metadata", is_flag=True, help="JSONL only: give each row the Inferencer's `metadata` object "
                 "(model_id, inference_time, token_count, generation_config)."),
    click.option("--output-format", type=click.Choice(["rows", "openai-batch"]),
                 help="rows: one result row per input row; openai-batch: the OpenAI Batch API's output file (.jsonl), "
                 "failed requests also in OUTPUT.errors.jsonl [default: openai-batch when the input was a batch file]."),
)


class BatchSizeType(click.ParamType):
    name = "N|auto"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | str:
        from shardgen.schemas.errors import InvalidParameter
        from shardgen.schemas.runtime import parse_batch_size

        try:
            return parse_batch_size(value)
        except InvalidParameter:
            self.fail(f"{value!r} is neither a positive number of sequences nor auto", param, ctx)


runtime_options = _options(
    click.option("--device", help="cpu, cuda or cuda:N; auto takes a GPU no other worker of this host holds, else cpu "
                 "[default: auto; env SHARDGEN_DEVICE]."),
    click.option("--engine", help="What generates: shardgen (its own engine), vllm, hf-generate (transformers' "
                 "generate), auto (vllm on a CUDA device when installed, else shardgen), or package.module:factory "
                 "[default: auto; env SHARDGEN_ENGINE]."),
    click.option("--batch-size", type=BatchSizeType(),
                 help="Sequences decoded together, or auto: the most whose KV cache fits --max-memory "
                 "[default: auto; env SHARDGEN_BATCH_SIZE]."),
    click.option("--max-memory", help="Memory budget for --batch-size auto, e.g. 8GiB [default: the device's free "
                 "memory; env SHARDGEN_MAX_MEMORY]."),
    click.option("--compile", is_flag=True, default=None, help="torch.compile the decode step where it helps."),
)


def _collect_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Flags given on the command line, under canonical option names, merged over the --config file; storage
    options take effect for this process."""
    file_options = config_mod.load_config(kwargs.pop("config_path", None))
    flags = dict(kwargs)
    if flags.get("input_path") is not None:
        flags["input"] = flags.pop("input_path")
    else:
        flags.pop("input_path", None)
    if flags.get("keep_columns"):
        flags["keep_columns"] = tuple(c.strip() for c in flags["keep_columns"].split(",") if c.strip())
    options = config_mod.merge(file_options, flags)
    _use_storage_options(options.get("storage_options"))
    return options


def _use_storage_options(value: Any) -> None:
    if value:
        from shardgen.workers.storage import parse_storage_options, set_storage_options

        set_storage_options(parse_storage_options(value))


def _store(broker: str | None) -> Any:
    from shardgen.workers.lifecycle import RunStore

    return RunStore(broker)


class LazyGroup(click.Group):
    """Commands whose modules import heavy libraries (torch) load only when they are run, so `status`,
    `submit` and `collect` start in a fraction of a second."""

    lazy_commands = {
        "bench": "shardgen.producer.bench:bench",
        "quantize": "shardgen.producer.quantize:quantize",
        "score": "shardgen.producer.score:score",
    }
    old_names = {"bench-quant": "quant", "bench-queue": "queue", "bench-submit": "submit", "bench-fleet": "fleet"}
    """Earlier names of the bench subcommands, still accepted (not listed): `bench-queue` is `bench queue`."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy_commands])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        import importlib

        if name in self.old_names:
            bench = importlib.import_module("shardgen.producer.bench")
            return bench.bench.get_command(ctx, self.old_names[name])
        if name in self.lazy_commands:
            module, attribute = self.lazy_commands[name].split(":")
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="shardgen")
def cli() -> None:
    """shardgen: run a language model over a whole dataset.

    \b
    Embedded, one process, no services:
      shardgen run prompts.jsonl -o results.parquet
    Distributed, Redis + Celery workers on GPU nodes:
      shardgen submit prompts.jsonl --work-dir s3://bucket/runs   (prints RUN_ID)
      shardgen worker --devices all                                (one per node)
      shardgen status RUN_ID --watch
      shardgen collect RUN_ID -o results.parquet
    """


# ---------------------------------------------------------------- run
@cli.command()
@input_options
@click.option("-o", "--output", help="Result file or URL (s3://..., gs://...); .parquet or .jsonl chooses the format.")
@model_options
@hf_token_option
@generation_options
@runtime_options
@storage_option
@result_options
@click.option("--show", type=int, default=5, show_default=True, help="Result rows to show in the closing table (0: none).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (never the input).")
@config_option
@one_line_errors
def run(show: int, score: bool, metrics: tuple[str, ...], row_metadata: bool, overwrite: bool, output_format: str | None,
        **kwargs: Any) -> None:
    """Generate for every row of INPUT in this process (no Redis, no workers) and write OUTPUT.

    INPUT is a .jsonl/.json/.csv/.parquet file or URL, a save_to_disk directory or a hub dataset name.
    Finished shards wait in OUTPUT.parts until the end: an interrupted run resumes from there when started
    again with the same settings.
    """
    quiet_libraries()
    from .embedded import run_embedded

    options = _collect_options(kwargs)
    if not options.get("output"):
        raise ShardgenError("no output file given", "pass -o results.parquet (or .jsonl)")
    output_format = output_format or options.get("output_format")
    spec = config_mod.build_run_spec(options)
    output = str(options["output"])
    check_output_target(output, overwrite=overwrite, inputs=(spec.input,))
    summary = run_embedded(
        spec,
        output,
        config_mod.build_runtime(options),
        score_metrics=metrics if score else None,
        row_metadata=row_metadata,
        console=console.get(),
        openai_batch=None if output_format is None else output_format == "openai-batch",
    )
    from .display import human_bytes, human_duration, key_value_table

    if summary.spec.input_format == "openai-batch" or output_format == "openai-batch":
        show = 0  # batch output lines are not result rows; the errors file holds what failed
        _show_results(output, spec.columns.output_column, show)
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
    _print_score(summary.report.score)


def _print_score(summary: Any) -> None:
    if summary is not None:
        from .score import print_summary

        print_summary(out, summary)


def _show_results(output: str, output_column: str, limit: int) -> None:
    from shardgen.workers.storage import read_table
    from shardgen.workers.storage import open_input

    from .display import rows_table

    if output.endswith(".parquet"):
        table = read_table(output).slice(0, limit).to_pylist()
    else:
        with open_input(output) as handle:
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


# ---------------------------------------------------------------- submit
@cli.command()
@input_options
@click.option("--work-dir", help="Directory or URL (s3://bucket/runs) every worker can read and write; the run lives in WORK_DIR/RUN_ID/.")
@model_options
@generation_options
@click.option("--max-retries", type=int, help="Retries of a failing shard before it is marked failed [default: 3].")
@click.option("--engine", type=click.Choice(PINNED_ENGINES),
              help="Serve the run only with workers of this engine [default: any engine].")
@broker_option
@storage_option
@click.option("--resume", "resume_id", metavar="RUN_ID", help="Redo only the shards of RUN_ID without a result (same settings required).")
@click.option("--json", "as_json", is_flag=True, help="Print the run's status as JSON instead of the run id.")
@config_option
@one_line_errors
def submit(as_json: bool, resume_id: str | None, **kwargs: Any) -> None:
    """Stage INPUT in the work directory and queue one job per shard on Redis; print the run id.

    The input is read once and written to WORK_DIR/RUN_ID/input/ as Parquet, so workers need no access to
    INPUT, and Redis holds only metadata. Workers read their shard there and write their results beside it.
    """
    quiet_libraries()
    from shardgen.workers.lifecycle import run_status
    from shardgen.workers.storage import describe

    from .submit import resume_run, submit_run

    options = _collect_options(kwargs)
    if not options.get("work_dir"):
        raise ShardgenError("no work directory given", "pass --work-dir DIR (or s3://bucket/prefix), a location every worker can write")
    spec = config_mod.build_run_spec(options)
    store = _store(options.get("broker"))
    work_dir = describe(str(options["work_dir"]))
    if resume_id:
        submitted = resume_run(spec, resume_id, work_dir, store)
        console.print(f"resuming run {resume_id}: {submitted.requeued} of {submitted.shards} shard(s) queued again")
    else:
        submitted = submit_run(spec, work_dir, store, console)
    run_id = submitted.spec.run_id
    if as_json:
        print_json({**run_status(store.record(run_id), store.now()), "spec": submitted.spec.to_dict()})
        return
    out.print(run_id, highlight=False, soft_wrap=True)
    model = submitted.spec.model
    console.print(
        f"{submitted.rows:,} rows in {submitted.shards:,} shards queued on {submitted.queue}; serve it with "
        f"`shardgen worker {model.worker_flags()}`",
        highlight=False, soft_wrap=True,
    )


@cli.command()
@click.argument("run_id")
@broker_option
@storage_option
@one_line_errors
def retry(run_id: str, broker: str | None, storage_options: str | None) -> None:
    """Queue RUN_ID's failed, cancelled and lost shards again, done ones whose result is gone, and done ones with
    failed rows (a row that fails for its own reasons, such as a prompt longer than the context, fails again).

    Workers read their input from the run's staged copy, so the original input is not needed.
    """
    from shardgen.schemas.layout import RunLayout
    from shardgen.workers.lifecycle import redo_run
    from shardgen.workers.queue.doorbell import Doorbell

    _use_storage_options(storage_options)
    store = _store(broker)
    record = store.record(run_id, details=False)
    requeued = redo_run(store, RunLayout(record.work_dir, run_id, record.spec.shard_size), failed_rows=True)
    Doorbell.of(store).ring(record.queue)
    if not requeued:
        console.print(f"run {run_id} has nothing to retry: every shard is done, without failed rows, or running")
        return
    console.print(f"queued {requeued} shard(s) of run {run_id} again")


@cli.command()
@click.argument("run_id")
@broker_option
@one_line_errors
def cancel(run_id: str, broker: str | None) -> None:
    """Stop RUN_ID: queued shards are dropped, running ones stop at their next step. `retry` resumes it."""
    ended = _store(broker).cancel(run_id)
    if ended is not None:
        raise ShardgenError(f"run {run_id} has already ended ({ended.value})", "nothing to cancel")
    console.print(f"run {run_id} cancelled")


@cli.command()
@click.argument("run_ids", nargs=-1, metavar="[RUN_ID]...")
@click.option("--older-than-days", type=click.FloatRange(min=0), default=7.0, show_default=True,
              help="Without RUN_IDs: every run that finished longer ago than this.")
@click.option("--staged-input", is_flag=True, help="Also delete each run's staged input (WORK_DIR/RUN_ID/input/); "
              "its results and run.json stay, so `collect --work-dir` still works, `retry` no longer does.")
@broker_option
@storage_option
@one_line_errors
def gc(run_ids: tuple[str, ...], older_than_days: float, staged_input: bool, broker: str | None,
       storage_options: str | None) -> None:
    """Remove finished runs from Redis now (they expire by themselves after SHARDGEN_RUN_TTL_DAYS, 30 by default).

    A run still queued or running is never removed.
    """
    from shardgen.schemas.layout import RunLayout
    from shardgen.workers.storage import files

    _use_storage_options(storage_options)
    store = _store(broker)
    if run_ids:
        chosen = []
        for run_id in run_ids:
            record = store.record(run_id, details=False)
            if not record.finished:
                raise ShardgenError(f"run {run_id} is {record.state.value}", f"cancel it first: `shardgen cancel {run_id}`")
            chosen.append((run_id, record.work_dir))
    else:
        chosen = store.finished_before(store.now() - older_than_days * 86400)
    for run_id, work_dir in chosen:
        if staged_input:
            files.remove_tree(RunLayout(work_dir, run_id, 1).input_dir)
        store.remove_run(run_id)
    what = " and their staged input" if staged_input else ""
    console.print(f"removed {len(chosen)} finished run(s){what}" + (f": {', '.join(r for r, _ in chosen)}" if chosen else ""))


# ---------------------------------------------------------------- worker
@cli.command()
@click.option("--devices", help="One worker process per device on this node, supervised: all (every GPU), GPU ids such "
              "as 0,1,3, or cpu,cpu. Each is pinned with CUDA_VISIBLE_DEVICES; a crashed one is restarted.")
@model_options
@hf_token_option
@runtime_options
@broker_option
@storage_option
@click.option("--gpus-per-worker", type=click.IntRange(min=1),
              help="GPUs per worker process for one model split over them (vLLM's tensor parallelism, --engine vllm): "
              "with --devices, each worker is pinned to that many GPUs, e.g. --devices all --gpus-per-worker 4 "
              "[default: 1; env SHARDGEN_GPUS_PER_WORKER].")
@click.option("--grace-seconds", type=click.FloatRange(min=0),
              help="On SIGTERM/SIGINT, stop taking shards, let the running one finish for this long, then give it back "
              f"to its queue at once [default: {DEFAULT_GRACE_SECONDS:g}; env SHARDGEN_GRACE_SECONDS].")
@click.option("--stall-seconds", type=click.FloatRange(min=0),
              help="Give up a shard that makes no progress (no token, no row) for this long [default: "
              f"{DEFAULT_STALL_SECONDS:g}; env SHARDGEN_STALL_SECONDS].")
@click.option("--shards-in-flight", type=click.IntRange(1, 8),
              help="Shards a worker holds at once: the next joins the engine's batch while the current one drains, so "
              "the batch stays full at shard ends; each keeps its own lease and result (1: one at a time) "
              f"[default: {DEFAULT_SHARDS_IN_FLIGHT}; env SHARDGEN_SHARDS_IN_FLIGHT].")
@click.option("--metrics-port", type=click.IntRange(1, 65535), help="Serve Prometheus metrics on this port (/metrics); "
              "with --devices, the workers use PORT, PORT+1, ...")
@click.option("--metrics-host", help="Address the metrics server binds [default: 0.0.0.0, every interface].")
@click.option("--log-format", type=click.Choice(["text", "json"]),
              help="text, or json: one JSON object per line, with the run id and shard of the record [default: text].")
@click.option("--loglevel", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), help="[default: INFO]")
@click.option("--name", help="Worker node name [default: shardgen-MODEL-DEVICE@HOST].")
@config_option
@one_line_errors
def worker(devices: str | None, **kwargs: Any) -> None:
    """Serve one model: load it once per device, then process shards from its queue until stopped.

    `--devices all` runs one worker per GPU of this node (one command per node); without it, one worker runs
    on --device. Runs only reach workers started with the same --model and --quantize. SIGTERM (a scale-down)
    gives the running shard back to its queue within --grace-seconds, so no shard waits for a lease to expire.
    """
    quiet_libraries()
    from shardgen.workers import WorkerConfig

    options = _collect_options(kwargs)
    settings = ("broker", "metrics_port", "metrics_host", "log_format", "loglevel", "name", "storage_options")
    runtime = config_mod.build_runtime(options)
    config = WorkerConfig(
        # a bad option is refused here, not in every child; the engine is part of the weights' identity
        model=config_mod.build_model_spec(options, engine=pinned_engine(runtime.engine)),
        runtime=runtime,
        **{key: options[key] for key in settings if options.get(key) is not None},
    )
    if devices:
        from shardgen.workers import parse_devices, supervise

        if options.get("device"):
            raise ShardgenError("--devices and --device cannot be used together", "use --devices for a node, --device for one worker")
        sys.exit(supervise(parse_devices(devices), config))
    from shardgen.workers import start_worker

    start_worker(config)


# ---------------------------------------------------------------- status
@cli.command()
@click.argument("run_id", required=False)
@broker_option
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable record (state, rows_total, rows_done, queue_depth, workers, ...).")
@click.option("--watch", is_flag=True, help="Refresh until the run ends.")
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds between refreshes with --watch.")
@one_line_errors
def status(run_id: str | None, broker: str | None, as_json: bool, watch: bool, interval: float) -> None:
    """Show a run's shards (queued/running/done/failed), rows, tokens/s, ETA, its queue and live workers.

    Without RUN_ID, list recent runs. Exit code with --watch: 0 when the run is done, 1 when it failed
    or was cancelled.
    """
    store = _store(broker)
    if run_id is None:
        records = [store.record(r, details=False) for r in store.run_ids()]
        if as_json:
            print_json([{"run_id": r.run_id, "state": r.state.value, "rows_total": r.rows_total, "rows_done": r.rows_done} for r in records])
        else:
            from .status import runs_table

            out.print(runs_table(records))
        return
    current = _run_status(store, run_id)
    if as_json and not watch:
        print_json(current)
        return
    from .status import status_view

    if not watch:
        out.print(status_view(current))
        return
    from rich.live import Live

    with Live(status_view(current), console=out.get(), refresh_per_second=4) as live:
        unreachable_since: float | None = None
        while current["finished_at"] is None:
            time.sleep(interval)
            try:
                current = _run_status(store, run_id)
                unreachable_since = None
            except Exception as exc:  # Redis restarting: keep watching for a while before giving up
                unreachable_since = unreachable_since or time.time()
                if time.time() - unreachable_since > 120:
                    raise BrokerError(f"lost Redis for 2 minutes while watching run {run_id}: {exc}", "check the broker and watch again") from None
                continue
            live.update(status_view(current))
    if as_json:
        print_json(current)
    sys.exit(0 if current["state"] == "done" else 1)


def _run_status(store: Any, run_id: str) -> dict[str, Any]:
    from shardgen.workers.lifecycle import current_status

    return current_status(store, run_id)


# ---------------------------------------------------------------- collect
@cli.command()
@click.argument("run_id")
@click.option("-o", "--output", required=True, help="Merged result, a file or URL; .parquet or .jsonl.")
@click.option("--work-dir", help="Work directory of the run: read it from WORK_DIR/RUN_ID/ without Redis [default: ask Redis].")
@click.option("--allow-partial", is_flag=True, help="Write what is there even if rows are missing or failed (exit 0).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists (never the run's input).")
@result_options
@broker_option
@storage_option
@one_line_errors
def collect(run_id: str, output: str, work_dir: str | None, allow_partial: bool, overwrite: bool, broker: str | None,
            storage_options: str | None, score: bool, metrics: tuple[str, ...], row_metadata: bool,
            output_format: str | None) -> None:
    """Merge RUN_ID's result shards into one file in input order, checking every row appears once.

    Missing or failed rows are listed and make the exit code non-zero unless --allow-partial.
    With --work-dir the run is read from WORK_DIR/RUN_ID/run.json and Redis is not needed.
    """
    from shardgen.schemas.errors import IncompleteRun, RunNotFound
    from shardgen.schemas.layout import RunLayout, join
    from shardgen.schemas.shard import check_run_id
    from shardgen.workers.storage import read_run_file

    from .collect import collect as collect_run
    from .collect import output_format as check_output_name
    from .display import rows_table

    check_run_id(run_id)
    check_output_name(output)
    _use_storage_options(storage_options)
    recorded: dict[int, str] = {}
    if work_dir is None:
        store = _store(broker)
        work_dir = store.record(run_id, details=False).work_dir
        recorded = {s.index: s.result for s in store.shards(run_id) if s.result}
    found = read_run_file(join(work_dir, run_id))
    if found is None:
        raise RunNotFound(f"no run {run_id} in {work_dir}", "check the run id and --work-dir")
    spec, rows_total, shards_total = found
    layout = RunLayout(work_dir, run_id, spec.shard_size)
    check_output_target(output, overwrite=overwrite, inputs=(spec.input, layout.run_dir))
    report = collect_run(layout, spec, rows_total, shards_total, output, allow_partial=allow_partial, recorded_results=recorded,
                         score_metrics=metrics if score else None, row_metadata=row_metadata,
                         openai_batch=None if output_format is None else output_format == "openai-batch")
    if report.failed_rows:
        out.print(rows_table("failed rows", ["row", "id", "error"], [(r["row_index"], r["id"], r["error"]) for r in report.failed_rows[:50]]))
    if report.missing_rows:
        console.print(f"[red]{len(report.missing_rows)} row(s) missing (shards {report.missing_shards[:20]})")
    if report.written:
        console.print(f"wrote {report.rows_written:,} of {rows_total:,} rows to {report.output}")
        _print_score(report.score)
    if report.written and report.failed_rows_allowed and report.failed_rows:
        from .openai_batch import errors_location

        console.print(f"{len(report.failed_rows)} request(s) failed: their errors are in {errors_location(output)}")
    if not report.complete and not allow_partial:
        raise IncompleteRun(
            f"run {run_id} is incomplete: {len(report.missing_rows)} row(s) missing, {len(report.failed_rows)} failed",
            f"nothing written; retry with `shardgen retry {run_id}`, or write what is there with --allow-partial",
        )


def main() -> None:
    cli(prog_name="shardgen")


if __name__ == "__main__":
    main()
