"""process_shard: one shard in, one Parquet object out. Knows nothing of Celery or Redis; both the embedded
mode and the Celery task call it, so both produce the same files.

It writes to the location its caller names (one per attempt); which attempt becomes the shard's result is the
caller's decision (the run store's atomic completion in distributed mode).
"""

from __future__ import annotations

import functools
import json
import logging
import socket
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from shardgen.schemas.errors import InvalidParameter
from shardgen.schemas.run import RunSpec, row_seed
from shardgen.schemas.sampling import SamplingParams
from shardgen.schemas.shard import Shard

from .faults import ROW_RAISED, WorkerFault, describe, is_device_error
from .generation import EngineOOM, GenerationCancelled, GenerationOutput, GenerationRequest, Generator
from .models.loader import LoadedModel
from .prompts import PromptTokens, tokenize_row
from .storage.run_files import write_table
from .writer import result_table

log = logging.getLogger(__name__)

OnRow = Callable[[GenerationOutput], None]


@dataclass
class ShardOutcome:
    shard_index: int
    location: str
    """Where this attempt's result was written."""
    rows: int
    rows_failed: int
    prompt_tokens: int
    generated_tokens: int
    seconds: float
    batch_halvings: int = 0
    """Times the batch was halved after running out of memory."""


@functools.cache
def shardgen_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shardgen")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class PreparedShard:
    """A shard's rows made ready to generate: the outputs of rows that failed before generation, the prompts,
    and one request per row still to generate (`pending[k]` is the row position of `requests[k]`)."""

    shard: Shard
    outputs: list[GenerationOutput | None]
    prompts: list[PromptTokens | None]
    pending: list[int]
    requests: list[GenerationRequest]
    started: float

    def fill(self, generated: Sequence[GenerationOutput]) -> None:
        """The outputs of `requests`, in their order."""
        for position, output in zip(self.pending, generated):
            self.outputs[position] = output


def process_shard(
    shard: Shard,
    spec: RunSpec,
    loaded: LoadedModel,
    generator: Generator,
    location: str,
    *,
    attempt: int = 1,
    worker: str = "embedded",
    on_row: OnRow | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ShardOutcome:
    prepared = prepare_shard(shard, spec, loaded, on_row)
    check_adapters(prepared.requests, generator)
    generated, halvings = generate_halving_on_oom(generator, prepared.requests, spec, on_row, should_stop)
    prepared.fill(generated)
    return finish_shard(prepared, spec, loaded, generator, location, attempt=attempt, worker=worker,
                        batch_halvings=halvings)


def prepare_shard(shard: Shard, spec: RunSpec, loaded: LoadedModel, on_row: OnRow | None = None) -> PreparedShard:
    """Tokenize each row and build its request; a row that cannot be prompted gets its error now (and on_row)."""
    started = time.perf_counter()
    rows = shard.rows
    outputs: list[GenerationOutput | None] = [None] * len(rows)
    prompts: list[PromptTokens | None] = [None] * len(rows)
    pending: list[int] = []
    own_params: list[SamplingParams | None] = [None] * len(rows)
    for position, row in enumerate(rows):
        if row.error is None and row.params is not None:
            own_params[position], row.error = row_params(spec, row.params)
        if row.error is not None:
            outputs[position] = GenerationOutput.failed(row.error)
            continue
        try:
            prompt = tokenize_row(
                loaded.tokenizer,
                row,
                chat_template=spec.chat_template,
                system_prompt=spec.columns.system_prompt,
                max_prompt_tokens=spec.max_prompt_tokens,
            )
        except Exception as exc:  # a template can reject a row's messages (e.g. roles out of order)
            outputs[position] = GenerationOutput.failed(f"cannot build the prompt: {exc}")
            continue
        prompts[position] = prompt
        pending.append(position)  # a prompt too long for the context fails in the generator (prompt_too_long)
    for position, output in enumerate(outputs):
        if output is not None and on_row:
            on_row(output)
    requests = [request_for(spec, rows[p].index, prompts[p].ids, own_params[p], rows[p].adapter)  # type: ignore[union-attr]
                for p in pending]
    return PreparedShard(shard, outputs, prompts, pending, requests, started)


def finish_shard(
    prepared: PreparedShard,
    spec: RunSpec,
    loaded: LoadedModel,
    generator: Generator,
    location: str,
    *,
    attempt: int = 1,
    worker: str = "embedded",
    batch_halvings: int = 0,
) -> ShardOutcome:
    """Write a shard whose every row has its output; a shard on which every row raised is the worker's fault."""
    shard, rows = prepared.shard, prepared.shard.rows
    check_not_every_row_raised([prepared.outputs[p] for p in prepared.pending])  # type: ignore[misc]
    done = [o for o in prepared.outputs if o is not None]
    assert len(done) == len(rows)
    metadata = {
        "run_id": spec.run_id,
        "shard_index": shard.index,
        "attempt": attempt,
        "rows": len(rows),
        "model": spec.model.model,
        "model_source": loaded.source,
        "adapter": loaded.info.get("adapter", ""),
        "quantize": spec.model.quantize,
        "model_identity": json.dumps(spec.model.identity, sort_keys=True),
        "params": spec.params.to_json(),
        "generator": getattr(generator, "last_path", None) or generator.name,
        "weights": getattr(generator, "weights", None) or str(spec.model.dtype),
        "version": shardgen_version(),
        "host": socket.gethostname(),
        "device": loaded.device,
        "worker": worker,
    }
    write_table(location, result_table(spec, rows, done, prepared.prompts, metadata, shard.input_types, loaded.tokenizer))
    return ShardOutcome(
        shard_index=shard.index,
        location=location,
        rows=len(rows),
        rows_failed=sum(1 for o in done if o.row_error is not None),
        prompt_tokens=sum(o.prompt_tokens for o in done),
        generated_tokens=sum(o.generated_tokens for o in done),
        seconds=time.perf_counter() - prepared.started,
        batch_halvings=batch_halvings,
    )


def row_params(spec: RunSpec, values: dict) -> tuple[SamplingParams | None, str | None]:
    """A row's own parameters over the run's, or why they cannot be used (that row's error, in one line)."""
    named = spec.columns.params_column and spec.input_format != "openai-batch"
    source = f"params column {spec.columns.params_column!r}" if named else "the request"
    try:
        params = spec.params.override(values, source=source)
    except InvalidParameter as exc:
        return None, f"{source}: {exc.line()}"
    if params.n > 1 and not spec.many_samples:
        return None, (f"{source}: n={params.n} needs a run with --n above 1 (the output then holds a list of samples "
                      "per row): pass --n 2 or more, or drop n from this row")
    return (None if params == spec.params else params), None


def request_for(spec: RunSpec, row_index: int, prompt_ids: list[int], params: SamplingParams | None,
                adapter: str | None = None) -> GenerationRequest:
    """A row's request: its prompt, its seed (from its own seed when it has one, so equal requests repeat), its
    own parameters, its own adapter."""
    if params is not None and params.seed is not None and params.seed != spec.params.seed:
        seed = row_seed(params.seed, 0)
    else:
        seed = spec.row_seed(row_index)
    return GenerationRequest(prompt_ids, seed=seed, params=params, adapter=adapter)


def check_adapters(requests: Sequence[GenerationRequest], generator: Generator) -> None:
    if any(r.adapter for r in requests) and not getattr(generator, "serves_adapters", False):
        raise InvalidParameter(f"per-row adapters (--adapter-column) run on vLLM, not on {generator.name}",
                               "add --engine vllm, or pass one adapter directory as --model")


def generate_halving_on_oom(
    generator: Generator,
    requests: Sequence[GenerationRequest],
    spec: RunSpec,
    on_row: OnRow | None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[GenerationOutput], int]:
    """Generate every request; out of memory, halve the generator's batch size and redo only unfinished rows.

    The halving lasts for this shard only: the next shard starts from the configured batch size again.
    """
    outputs: dict[int, GenerationOutput] = {}
    halvings = 0
    # A batch sized from memory ("auto") returns to auto, not to the size its last call happened to choose.
    configured = "auto" if getattr(generator, "auto_batch", False) else generator.batch_size

    def keep(index: int, output: GenerationOutput) -> None:
        if index in outputs:  # a batch that failed part-way is redone row by row; count each row once
            return
        outputs[index] = output
        if on_row:
            on_row(output)

    try:
        while True:
            remaining = [i for i in range(len(requests)) if i not in outputs]
            subset = [requests[i] for i in remaining]
            try:
                results = generate_rows(generator, subset, spec, lambda k, out: keep(remaining[k], out), should_stop)
            except EngineOOM as exc:
                if generator.batch_size <= 1:
                    raise
                generator.batch_size = max(1, generator.batch_size // 2)
                halvings += 1
                log.warning("%s; halved the batch size to %d and going on", exc, generator.batch_size)
                continue
            for k, output in zip(remaining, results):
                outputs.setdefault(k, output)
            return [outputs[i] for i in range(len(requests))], halvings
    finally:
        generator.batch_size = configured


def check_not_every_row_raised(outputs: Sequence[GenerationOutput]) -> None:
    """An exception that hit every row is not the rows' fault but the worker's: fail the attempt instead of
    recording a shard of failed rows (another worker gets it)."""
    if outputs and all(o.error is not None and o.error.startswith(ROW_RAISED) for o in outputs):
        raise WorkerFault(f"every one of the shard's {len(outputs)} row(s) raised; the first: "
                          f"{outputs[0].error.removeprefix(ROW_RAISED)}")


def generate_rows(
    generator: Generator,
    requests: Sequence[GenerationRequest],
    spec: RunSpec,
    on_output: Callable[[int, GenerationOutput], None] | None,
    should_stop: Callable[[], bool] | None = None,
) -> list[GenerationOutput]:
    """Generate a batch; if the batch as a whole fails, go row by row so one bad row cannot sink the rest. A
    device error fails the whole attempt at once (WorkerFault): no later row on this device can be trusted."""
    if not requests:
        return []
    kwargs = {"should_stop": should_stop} if should_stop is not None else {}
    try:
        return generator.generate(requests, spec.params, on_output=on_output, **kwargs)
    except (EngineOOM, GenerationCancelled, MemoryError):
        raise
    except Exception as exc:
        if is_device_error(exc):
            raise WorkerFault(f"the device failed: {describe(exc)}") from exc
        if len(requests) == 1:
            output = GenerationOutput.failed(f"{ROW_RAISED}{describe(exc)}", len(requests[0].prompt_ids))
            if on_output:
                on_output(0, output)
            return [output]
        log.warning("batch of %d rows failed (%s); retrying row by row", len(requests), exc)
    outputs = []
    for k, request in enumerate(requests):
        notify = (lambda _i, out, k=k: on_output(k, out)) if on_output else None
        outputs.extend(generate_rows(generator, [request], spec, notify, should_stop))
    return outputs
