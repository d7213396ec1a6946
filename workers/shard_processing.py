"""process_shard: one shard in, one Parquet object out. Knows nothing of Celery or Redis; both the embedded
mode and the Celery task call it, so both produce the same files.

It writes to the location its caller names (one per attempt); which attempt becomes the shard's result is the
caller's decision (the run store's atomic completion in distributed mode).
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from shardgen.schemas.errors import InvalidParameter
from shardgen.schemas.run import RunSpec
from shardgen.schemas.shard import Shard

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
    started = time.perf_counter()
    rows = shard.rows
    outputs: list[GenerationOutput | None] = [None] * len(rows)
    prompts: list[PromptTokens | None] = [None] * len(rows)
    pending: list[int] = []
    for position, row in enumerate(rows):
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

    requests = [GenerationRequest(prompts[p].ids, seed=spec.row_seed(rows[p].index), adapter=rows[p].adapter)  # type: ignore[union-attr]
                for p in pending]
    if any(r.adapter for r in requests) and not getattr(generator, "serves_adapters", False):
        raise InvalidParameter(f"per-row adapters (--adapter-column) run on vLLM, not on {generator.name}",
                               "add --engine vllm, or pass one adapter directory as --model")
    generated, halvings = generate_halving_on_oom(generator, requests, spec, on_row, should_stop)
    for position, output in zip(pending, generated):
        outputs[position] = output

    done = [o for o in outputs if o is not None]
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
        "params": spec.params.to_json(),
        "generator": getattr(generator, "last_path", None) or generator.name,
        "version": shardgen_version(),
        "host": socket.gethostname(),
        "device": loaded.device,
        "worker": worker,
    }
    write_table(location, result_table(spec, rows, done, prompts, metadata, shard.input_types))
    return ShardOutcome(
        shard_index=shard.index,
        location=location,
        rows=len(rows),
        rows_failed=sum(1 for o in done if o.error is not None),
        prompt_tokens=sum(o.prompt_tokens for o in done),
        generated_tokens=sum(o.generated_tokens for o in done),
        seconds=time.perf_counter() - started,
        batch_halvings=halvings,
    )


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


def generate_rows(
    generator: Generator,
    requests: Sequence[GenerationRequest],
    spec: RunSpec,
    on_output: Callable[[int, GenerationOutput], None] | None,
    should_stop: Callable[[], bool] | None = None,
) -> list[GenerationOutput]:
    """Generate a batch; if the batch as a whole fails, go row by row so one bad row cannot sink the rest."""
    if not requests:
        return []
    kwargs = {"should_stop": should_stop} if should_stop is not None else {}
    try:
        return generator.generate(requests, spec.params, on_output=on_output, **kwargs)
    except (EngineOOM, GenerationCancelled, MemoryError):
        raise
    except Exception as exc:
        if len(requests) == 1:
            output = GenerationOutput.failed(f"generation failed: {type(exc).__name__}: {exc}", len(requests[0].prompt_ids))
            if on_output:
                on_output(0, output)
            return [output]
        log.warning("batch of %d rows failed (%s); retrying row by row", len(requests), exc)
    outputs = []
    for k, request in enumerate(requests):
        notify = (lambda _i, out, k=k: on_output(k, out)) if on_output else None
        outputs.extend(generate_rows(generator, [request], spec, notify, should_stop))
    return outputs
