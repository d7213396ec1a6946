"""`shardgen bench engine` (plain `shardgen bench`): the engine against transformers' generate on the same prompts,
in one process.

Three workloads: "ragged" (chat prompts of varied length, sampled answers that end at EOS), "equal" (prompts of
one length, a fixed output length with EOS ignored), "prefix" (short chat rows behind one shared 400-token
system prompt of instructions, sampled answers that end at EOS) and "structured" (the ragged prompts and
sampling, each answer constrained to a JSON schema: enum, number, nested object; its note gives its tokens/s
as a share of ragged's, same generator and batch, measured in the same run). The engine runs each with its
prefix cache on and off (`--prefix-cache`). Per generator and workload it reports useful tokens/s
(generated tokens up to and including EOS), time to first token, padding waste (token positions computed that
were not prompt or useful output), the process's peak resident memory (RSS) during the run, and the ratio to HF
generate.

Generators run one after the other, each on a copy of the model loaded for it and freed after its runs, so a
run's RSS is that of a process serving that generator alone. The engine runs first and the bench reports memory
as a user sees it: process RSS before the model is loaded, after loading (and one forward, so its weights are
resident), after the engine is built, and at the peak of each run, beside the model's footprint and the KV cache.
"""

from __future__ import annotations

import ctypes
import gc
import itertools
import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import click

from shardgen.schemas.sampling import SamplingParams
from shardgen.workers.engine.memory import peak_rss_bytes, process_rss_bytes, reset_peak_rss
from shardgen.workers.generators import HF_BATCH_WITH_AUTO

from ..command_support import out
from .prompts import PREFIX_TOKENS, equal_prompts, ragged_prompts, shared_prefix_prompts

GENERATORS = ("engine", "vllm", "hf-generate", "hf-continuous", "hf-generate-no-cache")
GENERATOR_ALIASES = {"shardgen": "engine"}
"""`--generators` takes the names `--engine` takes: shardgen's engine is `engine` or `shardgen`."""
WORKLOADS = ("ragged", "equal", "prefix", "structured")
WORKLOAD_GROUPS = {"both": ("ragged", "equal"), "all": WORKLOADS}
STRUCTURED_SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "maxLength": 200},
        "kind": {"enum": ["fact", "opinion", "instruction", "other"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "meta": {"type": "object", "properties": {"language": {"type": "string", "maxLength": 20},
                                                   "safe": {"type": "boolean"}}, "required": ["language", "safe"]},
    },
    "required": ["answer", "kind", "confidence", "meta"],
}
"""The structured workload's schema: an enum, a number and a nested object around a free answer."""
PREFIX_CACHE_CHOICES = {"on,off": (True, False), "on": (True,), "off": (False,), "off,on": (False, True)}
BASELINE = "hf-generate"

@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    params: SamplingParams


@dataclass
class Result:
    generator: str
    workload: str
    prompts: int
    batch_size: int | None = None
    useful_tokens: int | None = None
    seconds: float | None = None
    tokens_per_s: float | None = None
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None
    padding_waste: float | None = None
    """Share of computed token positions that were neither prompt nor useful output."""
    batch_occupancy: float | None = None
    """Engine: share of its KV cache slots that decoded, over all decode steps."""
    peak_rss_mb: float | None = None
    """Peak resident memory of the whole process during the run."""
    peak_device_mb: float | None = None
    """On a GPU: peak memory allocated on it during the run."""
    kv_cache_mb: float | None = None
    memory_vs_model_and_cache: float | None = None
    """Engine: (peak RSS - runtime without the weights) / (model footprint + KV cache); see MemoryReport."""
    ratio_vs_hf: float | None = None
    prefix_cache: bool | None = None
    """Engine: whether its prefix cache was on."""
    reused_prefix_tokens: int | None = None
    """Engine: prompt tokens whose keys and values the prefix cache gave instead of a prefill."""
    ratio_vs_no_prefix_cache: float | None = None
    """Engine with the prefix cache on: tokens/s over the same run with it off."""
    ratio_vs_free_text: float | None = None
    """Structured workload: its tokens/s over the ragged workload's (same prompts, sampling, generator, batch)."""
    valid_outputs: int | None = None
    """Structured workload: outputs whose text was a whole instance of the schema."""
    path: str | None = None
    note: str | None = None


@dataclass
class Measured:
    useful_tokens: int
    first_token_s: list[float]
    computed_slots: int | None
    path: str | None = None
    batch_size: int | None = None
    batch_occupancy: float | None = None
    kv_cache_bytes: int | None = None
    reused_prefix_tokens: int | None = None
    valid_outputs: int | None = None


@dataclass
class MemoryReport:
    """Process RSS at the points a user sees while starting the engine, in MiB."""

    rss_before_load_mb: float | None = None
    """The interpreter, torch and shardgen, before the model is loaded."""
    rss_loaded_mb: float | None = None
    """After loading the model and one forward (a memory-mapped checkpoint is resident only once read)."""
    rss_engine_mb: float | None = None
    """After `Engine(...)`: weights packed, before any KV cache."""
    model_footprint_mb: float | None = None
    """transformers' get_memory_footprint() of the loaded model."""
    runtime_mb: float | None = None
    """The process without the model's weights (interpreter, torch, transformers, tokenizer): loaded - footprint."""


def build_workloads(tokenizer: Any, names: Sequence[str], count: int, max_new_tokens: int, seed: int) -> list[Workload]:
    chosen = []
    if "ragged" in names:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9, seed=seed)
        chosen.append(Workload("ragged", ragged_prompts(tokenizer, count, seed), params))
    if "equal" in names:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9, seed=seed, ignore_eos=True)
        chosen.append(Workload("equal", equal_prompts(tokenizer, count, 64), params))
    if "prefix" in names:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9, seed=seed)
        chosen.append(Workload("prefix", shared_prefix_prompts(tokenizer, count, seed, PREFIX_TOKENS), params))
    if "structured" in names:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9, seed=seed,
                                json_schema=STRUCTURED_SCHEMA)
        chosen.append(Workload("structured", ragged_prompts(tokenizer, count, seed), params))
    return chosen


def parse_workloads(value: str) -> tuple[str, ...]:
    """`ragged`, `both` (ragged, equal), `all`, or several comma-separated (e.g. `ragged,structured`)."""
    names: list[str] = []
    for part in (p.strip() for p in value.split(",") if p.strip()):
        group = WORKLOAD_GROUPS.get(part, (part,))
        if any(name not in WORKLOADS for name in group):
            raise click.BadParameter(f"unknown workload {part!r}: use {', '.join(WORKLOADS)}, both or all",
                                     param_hint="--workload")
        names.extend(n for n in group if n not in names)
    if not names:
        raise click.BadParameter("name at least one workload", param_hint="--workload")
    return tuple(names)


MEMORY_SAMPLE_SECONDS = 0.1
"""How often RSS is sampled where the kernel's own peak record cannot be reset."""


class PeakMemory:
    """Peak resident memory of the whole process while the block runs: the kernel's own record (VmHWM, reset on
    entry) on Linux, else RSS sampled every MEMORY_SAMPLE_SECONDS; and on a GPU the allocator's peak."""

    def __init__(self, device: str):
        self.device = device
        self.start_bytes = 0
        self.peak_bytes = 0
        self.device_peak_bytes: int | None = None

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start_bytes = process_rss_bytes()
        self._sampled = self.start_bytes
        self._kernel = reset_peak_rss()
        self._running = not self._kernel
        if self._running:
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def _watch(self) -> None:
        while self._running:
            self._sampled = max(self._sampled, process_rss_bytes())
            time.sleep(MEMORY_SAMPLE_SECONDS)

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            self.device_peak_bytes = torch.cuda.max_memory_allocated(self.device)
        if self._running:
            self._running = False
            self._thread.join()
        kernel_peak = peak_rss_bytes() if self._kernel else None
        self.peak_bytes = max(kernel_peak or 0, self._sampled, process_rss_bytes())


def release_freed_memory() -> None:
    """Hand what the process has freed back to the system (glibc keeps freed heap memory otherwise), so that the
    next generator's RSS does not include the last one's leftovers."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass


def run_engine(engine: Any, workload: Workload) -> Measured:
    from shardgen.workers.engine import Finished, NewToken
    from shardgen.workers.generation import GenerationRequest

    requests = [GenerationRequest(ids, seed=i) for i, ids in enumerate(workload.prompts)]
    first: dict[int, float] = {}
    useful = valid = 0
    before = engine.stats.copy()
    started = time.perf_counter()
    for event in engine.events(requests, workload.params):
        if isinstance(event, NewToken):
            first.setdefault(event.index, event.time - started)
        elif isinstance(event, Finished):
            useful += event.output.generated_tokens
            valid += event.output.row_error is None
    stats = engine.stats.since(before)
    return Measured(useful, list(first.values()), stats.computed_tokens, engine.last_path, stats.slots,
                    stats.batch_occupancy, stats.cache_bytes, stats.reused_prefix_tokens, valid)


class FirstTokenStreamer:
    """A transformers streamer that notes when a batch's first tokens arrive (its second call; the first is the
    prompt)."""

    def __init__(self) -> None:
        self.calls = 0
        self.time: float | None = None

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            self.time = time.perf_counter()

    def end(self) -> None:
        self.calls = 0


def streamed_hf_generate(loaded: Any, batch_size: int, streamer: FirstTokenStreamer, use_cache: bool = True) -> Any:
    from shardgen.workers.generators.hf_generate import HFGenerate

    class StreamedHFGenerate(HFGenerate):
        def generation_kwargs(self, params: SamplingParams, budget: int) -> dict:
            return {**super().generation_kwargs(params, budget), "streamer": streamer}

    # the baseline: plain batched generate
    return StreamedHFGenerate(loaded, batch_size, seed_per_request=False, use_cache=use_cache)


def run_hf_generate(loaded: Any, batch_size: int, workload: Workload, use_cache: bool = True) -> Measured:
    """Static batches, one after the other: every row of a batch gets its first token at the same time. Without
    its cache, each step computes every sequence again from its start."""
    from shardgen.workers.generation import GenerationRequest

    streamer = FirstTokenStreamer()
    hf = streamed_hf_generate(loaded, batch_size, streamer, use_cache)
    requests = [GenerationRequest(ids, seed=i) for i, ids in enumerate(workload.prompts)]
    first, useful, computed, valid = [], 0, 0, 0
    started = time.perf_counter()
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        outputs = hf.generate(batch, workload.params)
        valid += sum(o.row_error is None for o in outputs)
        first += [streamer.time - started] * len(batch)
        lengths = [len(s.token_ids) for o in outputs for s in o.samples]
        useful += sum(lengths)
        width = max(len(r.prompt_ids) for r in batch)
        steps = max(lengths)
        if use_cache:  # prefill with padding, then every row each step
            computed += len(lengths) * (width + steps - 1)
        else:  # every step recomputes every row from its start
            computed += len(lengths) * sum(width + step for step in range(steps))
    return Measured(useful, first, computed, "hf-generate" if use_cache else "hf-generate (no KV cache)", batch_size,
                    valid_outputs=valid)


def run_vllm(generator: Any, workload: Workload) -> Measured:
    """vLLM's generator as workers run it, on the same prompt ids and per-row seeds as the engine's run. vLLM
    reports each row when it finishes, so no time to first token is measured for it."""
    from shardgen.workers.generation import GenerationRequest

    requests = [GenerationRequest(ids, seed=i) for i, ids in enumerate(workload.prompts)]
    outputs = generator.generate(requests, workload.params)
    return Measured(sum(o.generated_tokens for o in outputs), [], None, generator.last_path, generator.batch_size)


def run_hf_continuous(model: Any, tokenizer: Any, workload: Workload) -> Measured:
    from transformers import GenerationConfig

    params = workload.params
    config = GenerationConfig(
        max_new_tokens=params.max_new_tokens,
        do_sample=not params.greedy,
        temperature=params.temperature or None,
        top_p=params.top_p,
        eos_token_id=None if params.ignore_eos else tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    started = time.perf_counter()
    results = model.generate_batch(inputs=workload.prompts, generation_config=config, record_timestamps=True)
    if len(results) != len(workload.prompts) or any(r.error for r in results.values()):
        raise RuntimeError("generate_batch lost or failed requests")
    useful = sum(len(r.generated_tokens) for r in results.values())
    first = [r.timestamps[0] - started for r in results.values() if r.timestamps]
    return Measured(useful, first, None, "transformers generate_batch")


def warm_up(loaded: Any) -> None:
    """One short forward, so that no generator's measurement pays for reading the weights in from disk."""
    import torch

    with torch.inference_mode():
        loaded.model(input_ids=torch.tensor([[loaded.tokenizer.eos_token_id or 0] * 4], device=loaded.device))


def measure(label: str, workload: Workload, device: str, run: Callable[[], Measured]) -> Result:
    """Run one generator on one workload."""
    gc.collect()
    result = Result(label, workload.name, len(workload.prompts))
    started = time.perf_counter()
    try:
        with PeakMemory(device) as memory:
            measured = run()
    except Exception as exc:  # a generator that cannot run here is reported, not fatal
        result.note = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        return result
    seconds = time.perf_counter() - started
    prompt_tokens = sum(len(p) for p in workload.prompts)
    result.batch_size = measured.batch_size
    result.useful_tokens = measured.useful_tokens
    result.valid_outputs = measured.valid_outputs
    result.seconds = seconds
    result.tokens_per_s = measured.useful_tokens / seconds
    if measured.first_token_s:
        result.ttft_p50_s = statistics.median(measured.first_token_s)
        result.ttft_p95_s = _percentile(measured.first_token_s, 0.95)
    if measured.computed_slots:
        computed_prompt = prompt_tokens - (measured.reused_prefix_tokens or 0)
        result.padding_waste = max(0.0, 1 - (computed_prompt + measured.useful_tokens) / measured.computed_slots)
    result.reused_prefix_tokens = measured.reused_prefix_tokens
    result.batch_occupancy = measured.batch_occupancy
    result.peak_rss_mb = memory.peak_bytes / 2**20
    if memory.device_peak_bytes is not None:
        result.peak_device_mb = memory.device_peak_bytes / 2**20
    if measured.kv_cache_bytes is not None:
        result.kv_cache_mb = measured.kv_cache_bytes / 2**20
    result.path = measured.path
    return result


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def add_ratios(results: list[Result]) -> None:
    baseline = {r.workload: r.tokens_per_s for r in results if r.generator == BASELINE and r.tokens_per_s}
    uncached = {(r.workload, r.batch_size): r.tokens_per_s for r in results
                if r.generator == "engine" and r.prefix_cache is False and r.tokens_per_s}
    for r in results:
        if r.tokens_per_s and r.workload in baseline:
            r.ratio_vs_hf = r.tokens_per_s / baseline[r.workload]
        if r.tokens_per_s and r.prefix_cache and (r.workload, r.batch_size) in uncached:
            r.ratio_vs_no_prefix_cache = r.tokens_per_s / uncached[(r.workload, r.batch_size)]
    free = {(r.generator, r.batch_size): r.tokens_per_s for r in results if r.workload == "ragged" and r.tokens_per_s}
    for r in results:
        if r.workload == "structured" and r.tokens_per_s and free.get((r.generator, r.batch_size)):
            r.ratio_vs_free_text = r.tokens_per_s / free[(r.generator, r.batch_size)]
            r.note = (f"{r.useful_tokens} tokens in {r.seconds:.1f}s; {r.ratio_vs_free_text:.2f}x ragged's tokens/s, "
                      f"{r.valid_outputs} of {r.prompts} outputs valid")


def print_table(results: list[Result], memory: MemoryReport, header: str) -> None:
    from rich.table import Table

    table = Table(title=header)
    columns = ("workload", "generator", "batch", "prefix cache", "useful tok/s", "vs HF", "vs no prefix cache",
               "TTFT p50 / p95 (s)", "padding waste", "occupancy", "peak RSS (MB)", "note")
    for column in columns:
        table.add_column(column, justify="left" if column in ("workload", "generator", "note") else "right")
    for r in results:
        table.add_row(
            r.workload,
            r.generator,
            _fmt(r.batch_size, "{}"),
            "-" if r.prefix_cache is None else ("on" if r.prefix_cache else "off"),
            _fmt(r.tokens_per_s, "{:.1f}"),
            _fmt(r.ratio_vs_hf, "{:.2f}x"),
            _fmt(r.ratio_vs_no_prefix_cache, "{:.2f}x"),
            f"{_fmt(r.ttft_p50_s, '{:.1f}')} / {_fmt(r.ttft_p95_s, '{:.1f}')}",
            _fmt(r.padding_waste, "{:.0%}"),
            _fmt(r.batch_occupancy, "{:.0%}"),
            _fmt(r.peak_rss_mb, "{:.0f}"),
            r.note or (f"{r.useful_tokens} tokens in {r.seconds:.1f}s" if r.seconds else ""),
        )
    console = out.get()
    console.print(table)
    if memory.rss_engine_mb is not None:
        console.print(
            f"engine memory (process RSS, MB): {memory.rss_before_load_mb:.0f} before loading the model, "
            f"{memory.rss_loaded_mb:.0f} loaded (after one forward), {memory.rss_engine_mb:.0f} with the engine built; "
            f"model footprint {memory.model_footprint_mb:.0f}, so the runtime without the weights is "
            f"{memory.runtime_mb:.0f}"
        )
        for r in results:
            if r.memory_vs_model_and_cache is not None:
                console.print(
                    f"  {r.workload}, batch {r.batch_size}: peak {r.peak_rss_mb:.0f} with a {r.kv_cache_mb:.0f} MB KV "
                    f"cache; (peak - runtime) / (footprint + KV cache) = {r.memory_vs_model_and_cache:.2f}"
                )


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def parse_batch_sizes(value: str) -> list[int | str]:
    """`16`, `auto` or several, comma-separated: the engine runs at each."""
    sizes: list[int | str] = []
    for part in value.split(","):
        part = part.strip()
        if part == "auto":
            sizes.append(part)
            continue
        try:
            number = int(part)
        except ValueError:
            number = 0
        if number < 1:
            raise click.BadParameter(f"must be positive integers or auto, got {value!r}", param_hint="--batch-size")
        sizes.append(number)
    return sizes


@click.command("engine")
@click.option("--model", default="smollm2-135m", show_default=True, help="Model alias, checkpoint directory or hub id.")
@click.option("--quantize", type=click.Choice(["none", "nf4", "fp4", "int8"]), default="none", show_default=True,
              help="bitsandbytes quantization of the weights.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--batch-size", default="16,auto", show_default=True,
              help="Batch size for every generator (engine slots, HF generate batch), or auto: the engine fits its "
              f"KV cache to --max-memory and HF generate runs at {HF_BATCH_WITH_AUTO}. Several, comma-separated, "
              "run the engine at each and HF generate at the first number. The default compares the engine with "
              "HF generate at the same batch, then runs it as workers do (auto).")
@click.option("--max-memory", default=None, help="Memory budget of the engine under --batch-size auto (e.g. 8GiB); "
              "default: what the process holds plus what the machine has free.")
@click.option("--step-tokens", type=click.IntRange(min=1), default=None,
              help="Engine: tokens per forward (decode tokens plus prefill chunks).")
@click.option("--prompts", "prompt_count", type=click.IntRange(min=1), default=128, show_default=True,
              help="Prompts per workload.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Most new tokens per prompt (exactly this many in the equal workload).")
@click.option("--workload", default="all", show_default=True,
              help="ragged: chat prompts of about 35-550 tokens (mean about 120), temperature 0.7, top_p 0.9, "
              "stop at EOS; "
              "equal: 64-token prompts, fixed output length (EOS ignored); "
              f"prefix: short chat rows behind one shared system prompt of {PREFIX_TOKENS}+ tokens, sampled as ragged; "
              "structured: the ragged prompts and sampling, answers constrained to a JSON schema (reported beside ragged, as a share of its tokens/s). "
              "both: ragged and equal; all: the four; or a comma-separated list, e.g. ragged,structured.")
@click.option("--prefix-cache", "prefix_cache", type=click.Choice(list(PREFIX_CACHE_CHOICES)), default="on,off",
              show_default=True, help="Run the engine with its prefix cache on, off, or both (each workload and "
              "batch size twice; the JSON rows carry prefix_cache).")
@click.option("--generators", default="engine,hf-generate", show_default=True,
              help=f"Comma-separated subset of {', '.join(GENERATORS)} (engine is also called shardgen; vllm runs "
              "vLLM's generator, at the first batch size given, with --max-memory as its KV cache; "
              "hf-continuous, transformers' generate_batch, is slow and memory-hungry on a CPU; "
              "hf-generate-no-cache recomputes every sequence at each step).")
@click.option("--no-kv-cache", is_flag=True, help="Also run hf-generate-no-cache: what a KV cache saves (slow).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the engine's decode step.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the ragged prompts and the sampling.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
def bench(model, quantize, device, batch_size, max_memory, step_tokens, prompt_count, max_new_tokens, workload,
          generators, no_kv_cache, compile_, seed, as_json, prefix_cache):
    """Measure the engine against transformers' generate (static batches), and optionally continuous batching
    (generate_batch), on the same prompts: useful tokens/s, time to first token, padding waste, memory."""
    from shardgen.schemas.model import ModelSpec
    from shardgen.workers.engine import Engine
    from shardgen.workers.models.loader import load_model

    chosen = [GENERATOR_ALIASES.get(g.strip(), g.strip()) for g in generators.split(",") if g.strip()]
    unknown = set(chosen) - set(GENERATORS)
    if unknown:
        raise click.BadParameter(f"unknown generator(s) {', '.join(sorted(unknown))}", param_hint="--generators")
    if no_kv_cache and "hf-generate-no-cache" not in chosen:
        chosen.append("hf-generate-no-cache")
    batches = parse_batch_sizes(batch_size)
    hf_batch = next((b for b in batches if isinstance(b, int)), HF_BATCH_WITH_AUTO)
    spec = ModelSpec(model=model, quantize=quantize)
    memory = MemoryReport()
    results: list[Result] = []
    workloads: list[Workload] = []
    used_device = device

    def run_all(name: str, run: Callable[[Workload], Measured], device_name: str,
                before_each: Callable[[], None] = release_freed_memory) -> None:
        for w in workloads:
            before_each()  # outside the measurement: its peak RSS starts from what this run inherits
            results.append(measure(name, w, device_name, lambda: run(w)))
            done = results[-1]
            click.echo(f"{w.name}/{name}: {done.note or f'{done.useful_tokens} tokens in {done.seconds:.1f}s'}", err=True)

    if "engine" in chosen:
        release_freed_memory()  # every reading below is of memory in use, not of what earlier work left in the heap
        memory.rss_before_load_mb = process_rss_bytes() / 2**20
        loaded = load_model(spec, device)
        workloads = build_workloads(loaded.tokenizer, parse_workloads(workload), prompt_count,
                                    max_new_tokens, seed)
        warm_up(loaded)
        release_freed_memory()
        memory.rss_loaded_mb = process_rss_bytes() / 2**20
        used_device = loaded.device
        memory.model_footprint_mb = loaded.footprint_bytes / 2**20
        memory.runtime_mb = memory.rss_loaded_mb - memory.model_footprint_mb
        options = {} if step_tokens is None else {"step_tokens": step_tokens}
        engine = Engine(loaded, batch_size=batches[0], max_memory=max_memory, compile=compile_, **options)
        release_freed_memory()
        memory.rss_engine_mb = process_rss_bytes() / 2**20
        for size, cached in itertools.product(batches, PREFIX_CACHE_CHOICES[prefix_cache]):
            engine.batch_size = size
            first = len(results)

            def free_cache() -> None:  # each run's memory includes the KV cache it sized, not the last one's,
                engine.free_cache()  # and its own prefix cache, empty at its start
                engine.prefix_cache = False
                engine.prefix_cache = cached
                release_freed_memory()

            run_all("engine", lambda w: run_engine(engine, w), loaded.device, free_cache)
            for r in results[first:]:
                r.prefix_cache = cached
                if r.peak_rss_mb is not None and r.kv_cache_mb is not None:
                    model_and_cache = memory.model_footprint_mb + r.kv_cache_mb
                    r.memory_vs_model_and_cache = (r.peak_rss_mb - memory.runtime_mb) / model_and_cache
        del engine, loaded  # transformers' generators get a plain copy: the engine packed this one in place
        release_freed_memory()
    others = [name for name in chosen if name not in ("engine", "vllm")]
    if others:
        plain = load_model(spec, device)
        if not workloads:
            workloads = build_workloads(plain.tokenizer, parse_workloads(workload),
                                        prompt_count, max_new_tokens, seed)
        warm_up(plain)
        runners: dict[str, Callable[[Workload], Measured]] = {
            "hf-generate": lambda w: run_hf_generate(plain, hf_batch, w),
            "hf-continuous": lambda w: run_hf_continuous(plain.model, plain.tokenizer, w),
            "hf-generate-no-cache": lambda w: run_hf_generate(plain, hf_batch, w, use_cache=False),
        }
        for name in others:
            run_all(name, runners[name], plain.device)
        used_device = plain.device
        del plain
        release_freed_memory()
    if "vllm" in chosen:  # last: vLLM binds this process's threads and memory policy for good
        from shardgen.schemas.runtime import RuntimeOptions
        from shardgen.workers.generators import load_generator

        runtime = RuntimeOptions(device=device, engine="vllm", batch_size=hf_batch if batches[0] == "auto" else batches[0],
                                 max_memory=max_memory)
        loaded_vllm, generator = load_generator(spec, runtime)
        if not workloads:
            workloads = build_workloads(loaded_vllm.tokenizer, WORKLOADS if workload == "both" else (workload,),
                                        prompt_count, max_new_tokens, seed)
        run_all("vllm", lambda w: run_vllm(generator, w), loaded_vllm.device)
        used_device = loaded_vllm.device
        generator.close()
    add_ratios(results)
    order = {name: i for i, name in enumerate(GENERATORS)}
    results.sort(key=lambda r: (WORKLOADS.index(r.workload), order[r.generator]))  # stable: engine batches in order
    config = dict(model=model, quantize=quantize, device=used_device, batch_size=batch_size, hf_batch_size=hf_batch,
                  workload=workload, prefix_cache=prefix_cache,
                  max_memory=max_memory, step_tokens=step_tokens, prompts=prompt_count,
                  max_new_tokens=max_new_tokens, seed=seed, compile=compile_)
    if as_json:
        click.echo(json.dumps({"config": config, "memory": asdict(memory), "results": [asdict(r) for r in results]},
                              indent=2))
    else:
        header = f"shardgen bench: {model} on {used_device}, batch {batch_size} (HF generate {hf_batch}), {prompt_count} " \
                 f"prompts, up to {max_new_tokens} new tokens"
        print_table(results, memory, header)
