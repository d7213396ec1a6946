"""`shardgen bench quant`: what each quantization method costs on one model, measured the same way for all.

Per method: load time, memory footprint right after loading and after a forward pass (compressed-tensors
checkpoints unpack their weights on the first forward in transformers, so the second is what a run holds),
greedy tokens/s on a fixed set of short chat prompts at one batch size, perplexity on a fixed English text, and
greedy agreement: the share of the unquantized model's greedy tokens a method reproduces (per prompt, the tokens
before the first that differs, over all tokens).

The engine's own weight formats on a CPU (`--weights`: float32, bfloat16, int8; see
workers/engine/weight_formats.py) get rows of their own, `engine float32` and so on: tokens/s through the engine,
perplexity through the packed model, agreement with `engine float32`. A format the CPU has no instructions for
is reported as such.
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from shardgen.schemas.errors import InvalidParameter, ShardgenError
from shardgen.schemas.model import QUANTIZE_METHODS, ModelSpec

from ..command_support import one_line_errors, out, quiet_libraries

console = Console(stderr=True)

DEFAULT_METHODS = ("none", "nf4", "fp4", "int8")
PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "How many days are in a week?",
    "What do bees make?",
    "Give a synonym for happy.",
    "What is two plus three?",
    "Which planet is closest to the Sun?",
    "What language is spoken in Spain?",
)
# Plain English prose written for this benchmark; the perplexity of each method on it is compared with none's.
PERPLEXITY_TEXT = (
    "The village sat at the edge of a wide valley, where the river slowed and spread into shallow pools before "
    "it reached the sea. In spring the fields turned green almost overnight, and the farmers walked out early "
    "to check the young wheat and mend the fences that the winter storms had broken. Children followed the "
    "carts to the market on Saturdays, where bakers sold warm bread and old women traded eggs for thread and "
    "salt. Most people had lived there all their lives, and they knew the names of every hill and stream.\n\n"
    "A library was built near the church when the railway arrived, and for the first time the villagers could "
    "borrow books about distant cities, machines and the history of other countries. The schoolteacher "
    "read to her pupils every afternoon, and many of them later said that those quiet hours had changed the way "
    "they saw the world. Today the station is closed and the trains no longer stop, but the library is still "
    "open, and on winter evenings its windows are the brightest light in the valley."
)


@dataclass
class MethodResult:
    method: str
    model: str
    load_s: float | None = None
    footprint_load_mb: float | None = None
    footprint_run_mb: float | None = None
    tokens_per_s: float | None = None
    perplexity: float | None = None
    greedy_agreement: float | None = None
    """Share of the reference's greedy tokens reproduced before the first difference (none, or engine float32)."""
    error: str | None = None
    tokens: list[list[int]] | None = None


def measure(spec: ModelSpec, label: str, device: str, batch_size: int, max_new_tokens: int) -> MethodResult:
    from shardgen.workers import load_model

    result = MethodResult(method=label, model=spec.model)
    try:
        loaded = load_model(spec, device)
    except ShardgenError as exc:
        result.error = exc.line()
        return result
    try:
        result.load_s = loaded.load_time_s
        result.footprint_load_mb = loaded.footprint_bytes / 2**20
        result.perplexity = perplexity(loaded, PERPLEXITY_TEXT)
        result.footprint_run_mb = loaded.footprint_bytes / 2**20
        result.tokens_per_s, result.tokens = greedy_tokens_per_second(loaded, PROMPTS, batch_size, max_new_tokens)
    finally:
        del loaded
        gc.collect()
    return result


ENGINE_FORMATS = ("float32", "bfloat16", "int8")


def measure_engine_format(model: str, weights: str, device: str, batch_size: int, max_new_tokens: int) -> MethodResult:
    """One engine weight format: the model loaded in float32, packed by the engine in `weights`."""
    from shardgen.schemas.sampling import SamplingParams
    from shardgen.workers import load_model
    from shardgen.workers.engine import Engine
    from shardgen.workers.generation import GenerationRequest

    result = MethodResult(method=f"engine {weights}", model=model)
    loaded = load_model(ModelSpec(model=model), device)
    try:
        engine = Engine(loaded, batch_size=batch_size, weights=weights, prefix_cache=False)
        if engine.weights != weights:
            result.error = f"this CPU runs {weights} without instructions of its own: the engine chose {engine.weights}"
            return result
        result.load_s = loaded.load_time_s
        result.footprint_load_mb = result.footprint_run_mb = _module_bytes(loaded.model) / 2**20
        result.perplexity = perplexity(loaded, PERPLEXITY_TEXT)
        inputs = chat_inputs(loaded, PROMPTS)
        requests = [GenerationRequest([t for t, m in zip(ids, mask) if m]) for ids, mask in
                    zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist())]
        params = SamplingParams(max_new_tokens=max_new_tokens)
        engine.generate(requests[:1], SamplingParams(max_new_tokens=2))  # oneDNN's first call for each shape
        started = time.perf_counter()
        outputs = engine.generate(requests, params)
        result.tokens = [o.samples[0].token_ids for o in outputs]
        result.tokens_per_s = sum(map(len, result.tokens)) / (time.perf_counter() - started)
    finally:
        del loaded
        gc.collect()
    return result


def _module_bytes(model: Any) -> int:
    """Parameters and buffers, each storage once (packed weights are buffers)."""
    import torch

    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.data_ptr() if tensor.layout == torch.strided else id(tensor)  # packed: opaque, no pointer
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def greedy_agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Share of the reference's tokens reproduced, per prompt up to the first token that differs."""
    agreed = 0
    for row, expected in zip(tokens, reference):
        for got, want in zip(row, expected):
            if got != want:
                break
            agreed += 1
    return agreed / max(1, sum(map(len, reference)))


def add_agreement(results: list[MethodResult]) -> None:
    references = {"engine": next((r for r in results if r.method == "engine float32" and r.tokens), None),
                  "hf": next((r for r in results if r.method == "none" and r.tokens), None)}
    for r in results:
        reference = references["engine" if r.method.startswith("engine ") else "hf"]
        if r.tokens and reference is not None:
            r.greedy_agreement = greedy_agreement(r.tokens, reference.tokens)


def perplexity(loaded: Any, text: str) -> float:
    """exp of the mean next-token cross-entropy over the text, in one forward pass."""
    import torch

    ids = loaded.tokenizer(text, return_tensors="pt").input_ids.to(loaded.device)
    with torch.no_grad():
        loss = loaded.model(input_ids=ids, labels=ids).loss
    return math.exp(float(loss))


def chat_inputs(loaded: Any, prompts: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """Left-padded token ids of the prompts in the model's chat template."""
    tokenizer = loaded.tokenizer
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(loaded.device)


def greedy_generate(loaded: Any, prompts: tuple[str, ...] | list[str], max_new_tokens: int) -> list[list[int]]:
    """Greedy new tokens per prompt, cut after the first end-of-sequence token."""
    import torch

    inputs = chat_inputs(loaded, prompts)
    with torch.no_grad():
        generated = loaded.model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id
        )
    rows = generated[:, inputs["input_ids"].shape[1]:].tolist()
    return [_until_eos(row, loaded.eos_token_ids) for row in rows]


def _until_eos(tokens: list[int], eos_ids: tuple[int, ...]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: index + 1]
    return tokens


def greedy_tokens_per_second(loaded: Any, prompts: tuple[str, ...], batch_size: int,
                             max_new_tokens: int) -> tuple[float, list[list[int]]]:
    """Useful new tokens (up to and including EOS) per second over all prompts, `batch_size` at a time; the tokens."""
    started = time.perf_counter()
    tokens: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        tokens += greedy_generate(loaded, prompts[start:start + batch_size], max_new_tokens)
    return sum(map(len, tokens)) / (time.perf_counter() - started), tokens


def render(results: list[MethodResult], device: str, batch_size: int, max_new_tokens: int) -> Table:
    baseline = next((r for r in results if r.method == "none" and r.error is None), None)
    engine_baseline = next((r for r in results if r.method == "engine float32" and r.error is None), None)
    table = Table(title=f"quantization on {device}: {len(PROMPTS)} prompts, batch {batch_size}, "
                        f"{max_new_tokens} new tokens max, greedy")
    for column in ("method", "load s", "memory MB (load)", "memory MB (run)", "vs none", "tokens/s", "speed vs ref",
                   "perplexity", "ppl vs ref", "greedy agreement"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in results:
        if r.error:
            table.add_row(r.method, f"[red]{r.error}", *[""] * 9)
            continue
        reference = engine_baseline if r.method.startswith("engine ") else baseline
        table.add_row(
            r.method, f"{r.load_s:.1f}", f"{r.footprint_load_mb:.0f}", f"{r.footprint_run_mb:.0f}",
            _ratio(r.footprint_run_mb, baseline and baseline.footprint_run_mb), f"{r.tokens_per_s:.1f}",
            _ratio(r.tokens_per_s, reference and reference.tokens_per_s),
            f"{r.perplexity:.2f}", _change(r.perplexity, reference and reference.perplexity),
            "-" if r.greedy_agreement is None else f"{r.greedy_agreement:.0%}",
        )
    return table


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else "-"


def _change(value: float, base: float | None) -> str:
    return f"{(value / base - 1) * 100:+.1f}%" if base else "-"


def method_specs(model: str, methods: list[str], gptq_model: str | None) -> list[tuple[str, ModelSpec]]:
    """(label, spec) per method; gptq is the checkpoint in --gptq-model, loaded as it says."""
    unknown = [m for m in methods if m not in QUANTIZE_METHODS]
    if unknown:
        raise InvalidParameter(f"unknown method(s) {', '.join(unknown)}", f"use {', '.join(QUANTIZE_METHODS)}")
    if "gptq" in methods and gptq_model is None:
        raise InvalidParameter(
            "--methods gptq needs --gptq-model DIR", f"make one with `shardgen quantize {model} --dataset FILE -o DIR`"
        )
    if gptq_model is not None and "gptq" not in methods:
        methods = [*methods, "gptq"]
    return [(m, ModelSpec(model=gptq_model) if m == "gptq" else ModelSpec(model=model, quantize=m)) for m in methods]


@click.command("quant")
@click.option("--model", default="smollm2-135m", show_default=True, help="Model to quantize each way.")
@click.option("--methods", default=",".join(DEFAULT_METHODS), show_default=True,
              help="Comma-separated methods; gptq comes from --gptq-model.")
@click.option("--gptq-model", type=click.Path(file_okay=False, exists=True),
              help="A checkpoint written by `shardgen quantize` from --model; adds a gptq row.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--batch-size", type=int, default=4, show_default=True, help="Prompts generated together.")
@click.option("--max-new-tokens", type=int, default=32, show_default=True, help="Most new tokens per prompt.")
@click.option("--weights", default=",".join(ENGINE_FORMATS), show_default=True,
              help="Engine weight formats to measure on a CPU (float32, bfloat16, int8; 'none' for none): rows "
              "'engine FORMAT', compared with 'engine float32'. Quantization methods are compared with 'none'.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@one_line_errors
def bench_quant(model: str, methods: str, gptq_model: str | None, device: str, batch_size: int, max_new_tokens: int,
                weights: str, as_json: bool) -> None:
    """Memory, load time, tokens/s, perplexity and greedy agreement of MODEL per quantization method and per engine
    weight format, on the same prompts."""
    from shardgen.workers import check_device

    if batch_size < 1 or max_new_tokens < 1:
        raise InvalidParameter("--batch-size and --max-new-tokens must be >= 1")
    specs = method_specs(model, [m.strip() for m in methods.split(",") if m.strip()], gptq_model)
    device = check_device(device)
    quiet_libraries()
    formats = [w.strip() for w in weights.split(",") if w.strip() and w.strip() != "none"]
    unknown = [w for w in formats if w not in ENGINE_FORMATS]
    if unknown:
        raise InvalidParameter(f"unknown weight format(s) {', '.join(unknown)}", f"use {', '.join(ENGINE_FORMATS)}")
    results = []
    for label, spec in specs:
        console.print(f"measuring {label} ...", highlight=False)
        results.append(measure(spec, label, device, batch_size, max_new_tokens))
    if device == "cpu":
        for weight_format in formats:
            console.print(f"measuring engine {weight_format} ...", highlight=False)
            results.append(measure_engine_format(model, weight_format, device, batch_size, max_new_tokens))
    add_agreement(results)
    if as_json:
        rows = [{k: v for k, v in asdict(r).items() if k != "tokens"} for r in results]
        click.echo(json.dumps({"device": device, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
                               "prompts": len(PROMPTS), "cpu_formats": _native_formats(), "results": rows}))
    else:
        out.print(render(results, device, batch_size, max_new_tokens))


def _native_formats() -> list[str]:
    from shardgen.workers.engine.weight_formats import native_formats

    return native_formats()
