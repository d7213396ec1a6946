"""`shardgen bench`: the engine against transformers' generate on the same prompts, in one process.

Two workloads: "ragged" (chat prompts of varied length, sampled answers that end at EOS) and "equal" (prompts of
one length, a fixed output length with EOS ignored). Per generator and workload it reports useful tokens/s
(generated tokens up to and including EOS), time to first token, padding waste (token positions computed that
were not prompt or useful output), peak memory above the loaded model (counting a packed copy of a tied LM head
that the engine adds), and the ratio to HF generate. The engine packs its model's weights in place, so
transformers' generators run on a plain copy loaded beside it.
"""

from __future__ import annotations

import ctypes
import json
import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import click

from shardgen.schemas.sampling import SamplingParams

GENERATORS = ("engine", "hf-generate", "hf-continuous", "engine-no-kv")
WORKLOADS = ("ragged", "equal")
BASELINE = "hf-generate"

TOPICS = [
    "the water cycle", "black holes", "the French revolution", "photosynthesis", "machine learning", "volcanoes",
    "the stock market", "honey bees", "the printing press", "climate change", "the human heart", "jazz music",
    "ancient Rome", "quantum computing", "coral reefs", "the Silk Road", "vaccines", "electric cars",
    "the Moon landing", "chess openings", "sourdough bread", "plate tectonics", "the Renaissance", "solar panels",
]
ASKS = [
    "What is {t}?", "Explain {t} to a ten-year-old.", "Give three facts about {t}.", "Why does {t} matter?",
    "Write a short poem about {t}.", "Summarize the history of {t} in a few sentences.",
    "What are common misconceptions about {t}?", "Compare {t} with {u}.", "Write a haiku about {t}.",
    "List the pros and cons of studying {t}.",
]
CONTEXT = [
    "I am preparing a lesson for my class next week.", "Keep the answer friendly and clear.",
    "My friend and I disagreed about this over dinner yesterday.", "Please avoid jargon where you can.",
    "I read an article about it but did not understand the details.", "Assume I know a little biology and physics.",
    "This is for a short presentation at work.", "Use an example from everyday life if possible.",
    "I have been curious about this since I was a child.", "Answer as if you were a patient teacher.",
    "My grandmother asked me and I could not answer.", "Mention one surprising detail.",
]
FILLER = "The quick brown fox jumps over the lazy dog while the curious cat watches from the old stone wall. "


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
    useful_tokens: int | None = None
    seconds: float | None = None
    tokens_per_s: float | None = None
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None
    padding_waste: float | None = None
    """Share of computed token positions that were neither prompt nor useful output."""
    peak_memory_mb: float | None = None
    ratio_vs_hf: float | None = None
    path: str | None = None
    note: str | None = None


@dataclass
class Measured:
    useful_tokens: int
    first_token_s: list[float]
    computed_slots: int | None
    path: str | None = None


PASSAGE_SHARE = 0.25
"""Share of ragged prompts that also carry a passage to read, the long tail of a real dataset's lengths."""


def ragged_prompts(tokenizer: Any, count: int, seed: int) -> list[list[int]]:
    """Chat prompts of varied length: a question about a topic after 0-10 sentences of context, and for one
    prompt in four a passage of notes before it. With the default model's chat template they run from about 35
    to 550 tokens, mean about 120, like the workload the engine's speed bar was set on."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        topic, other = rng.sample(TOPICS, 2)
        question = rng.choice(ASKS).format(t=topic, u=other)
        context = " ".join(rng.choice(CONTEXT) for _ in range(rng.choice([0, 0, 1, 2, 3, 5, 8, 10])))
        if rng.random() < PASSAGE_SHARE:
            notes = " ".join(rng.choice(CONTEXT + [FILLER.strip()]) for _ in range(rng.randint(10, 40)))
            context = f"My notes so far: {notes} {context}"
        messages = [{"role": "user", "content": f"{context} {question}".strip()}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def equal_prompts(tokenizer: Any, count: int, length: int) -> list[list[int]]:
    """`count` different raw-text prompts of exactly `length` tokens."""
    ids = tokenizer(FILLER * (length // 8 + count), add_special_tokens=False)["input_ids"]
    return [ids[i : i + length] for i in range(count)]


def build_workloads(tokenizer: Any, names: Sequence[str], count: int, max_new_tokens: int, seed: int) -> list[Workload]:
    chosen = []
    if "ragged" in names:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9, seed=seed)
        chosen.append(Workload("ragged", ragged_prompts(tokenizer, count, seed), params))
    if "equal" in names:
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9, seed=seed, ignore_eos=True)
        chosen.append(Workload("equal", equal_prompts(tokenizer, count, 64), params))
    return chosen


MEMORY_SAMPLE_SECONDS = 0.1
"""How often memory is sampled. mallinfo2 walks the heap under its lock, a few ms in a fragmented process: at
every 5 ms it slowed the generator being measured by a fifth; at 0.1 s it costs a few percent, alike for all."""


class PeakMemory:
    """Peak memory above the starting point while the block runs: the CUDA allocator's, or on the CPU the bytes
    malloc has handed out (RSS where glibc is not there), sampled. Unlike RSS, heap bytes fall again when a run
    frees what it used, so a generator is not credited with memory an earlier one left mapped."""

    def __init__(self, device: str):
        self.device = device
        self.peak_bytes = 0

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = _memory_in_use()
        self._max = self._start
        self._running = True
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while self._running:
            self._max = max(self._max, _memory_in_use())
            time.sleep(MEMORY_SAMPLE_SECONDS)

    def __exit__(self, *exc: Any) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._running = False
        self._thread.join()
        self.peak_bytes = max(self._max, _memory_in_use()) - self._start


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
    )]


def _glibc_mallinfo2() -> Callable[[], _MallInfo2] | None:
    try:
        function = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return None
    function.restype = _MallInfo2
    return function


_MALLINFO2 = _glibc_mallinfo2()


def _memory_in_use() -> int:
    if _MALLINFO2 is not None:
        info = _MALLINFO2()
        return info.uordblks + info.hblkhd  # bytes in use in the heaps plus chunks malloc mapped on its own
    return _rss()


def _rss() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_engine(engine: Any, workload: Workload) -> Measured:
    from shardgen.workers.engine import Finished, NewToken
    from shardgen.workers.generation import GenerationRequest

    requests = [GenerationRequest(ids, seed=i) for i, ids in enumerate(workload.prompts)]
    first: dict[int, float] = {}
    useful = 0
    started = time.perf_counter()
    for event in engine.events(requests, workload.params):
        if isinstance(event, NewToken):
            first.setdefault(event.index, event.time - started)
        elif isinstance(event, Finished):
            useful += event.output.generated_tokens
    return Measured(useful, list(first.values()), engine.computed_token_slots, engine.last_path)


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


def streamed_hf_generate(loaded: Any, batch_size: int, streamer: FirstTokenStreamer) -> Any:
    from shardgen.workers.engine.hf_generate import HFGenerate

    class StreamedHFGenerate(HFGenerate):
        def generation_kwargs(self, params: SamplingParams) -> dict:
            return {**super().generation_kwargs(params), "streamer": streamer}

    return StreamedHFGenerate(loaded, batch_size)


def run_hf_generate(loaded: Any, batch_size: int, workload: Workload) -> Measured:
    """Static batches, one after the other: every row of a batch gets its first token at the same time."""
    from shardgen.workers.generation import GenerationRequest

    streamer = FirstTokenStreamer()
    hf = streamed_hf_generate(loaded, batch_size, streamer)
    requests = [GenerationRequest(ids, seed=i) for i, ids in enumerate(workload.prompts)]
    first, useful, computed = [], 0, 0
    started = time.perf_counter()
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        outputs = hf.generate(batch, workload.params)
        first += [streamer.time - started] * len(batch)
        lengths = [len(s.token_ids) for o in outputs for s in o.samples]
        useful += sum(lengths)
        width = max(len(r.prompt_ids) for r in batch)
        computed += len(lengths) * (width + max(lengths) - 1)  # prefill with padding, then every row each step
    return Measured(useful, first, computed, "hf-generate")


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


def measure(label: str, workload: Workload, device: str, run: Callable[[], Measured], added_bytes: int = 0) -> Result:
    """Run one generator on one workload; `added_bytes` is memory it holds beyond the model outside the run."""
    import gc

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
    result.useful_tokens = measured.useful_tokens
    result.seconds = seconds
    result.tokens_per_s = measured.useful_tokens / seconds
    if measured.first_token_s:
        result.ttft_p50_s = statistics.median(measured.first_token_s)
        result.ttft_p95_s = _percentile(measured.first_token_s, 0.95)
    if measured.computed_slots:
        result.padding_waste = max(0.0, 1 - (prompt_tokens + measured.useful_tokens) / measured.computed_slots)
    result.peak_memory_mb = (memory.peak_bytes + added_bytes) / 2**20
    result.path = measured.path
    return result


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def add_ratios(results: list[Result]) -> None:
    baseline = {r.workload: r.tokens_per_s for r in results if r.generator == BASELINE and r.tokens_per_s}
    for r in results:
        if r.tokens_per_s and r.workload in baseline:
            r.ratio_vs_hf = r.tokens_per_s / baseline[r.workload]


def print_table(results: list[Result], header: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=header)
    for column in ("workload", "generator", "useful tok/s", "vs HF", "TTFT p50 / p95 (s)", "padding waste", "peak mem (MB)", "note"):
        table.add_column(column, justify="left" if column in ("workload", "generator", "note") else "right")
    for r in results:
        table.add_row(
            r.workload,
            r.generator,
            _fmt(r.tokens_per_s, "{:.1f}"),
            _fmt(r.ratio_vs_hf, "{:.2f}x"),
            f"{_fmt(r.ttft_p50_s, '{:.2f}')} / {_fmt(r.ttft_p95_s, '{:.2f}')}",
            _fmt(r.padding_waste, "{:.0%}"),
            _fmt(r.peak_memory_mb, "{:.0f}"),
            r.note or (f"{r.useful_tokens} tokens in {r.seconds:.1f}s" if r.seconds else ""),
        )
    Console().print(table)


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


@click.command("bench")
@click.option("--model", default="smollm2-135m", show_default=True, help="Model alias, checkpoint directory or hub id.")
@click.option("--quantize", type=click.Choice(["none", "nf4", "fp4", "int8"]), default="none", show_default=True,
              help="bitsandbytes quantization of the weights.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Batch size for every generator (engine slots, HF generate batch).")
@click.option("--prompts", "prompt_count", type=click.IntRange(min=1), default=128, show_default=True,
              help="Prompts per workload.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Most new tokens per prompt (exactly this many in the equal workload).")
@click.option("--workload", type=click.Choice(["ragged", "equal", "both"]), default="both", show_default=True,
              help="ragged: chat prompts of about 35-550 tokens (mean about 120), temperature 0.7, top_p 0.9, "
              "stop at EOS; "
              "equal: 64-token prompts, fixed output length (EOS ignored).")
@click.option("--generators", default="engine,hf-generate,hf-continuous", show_default=True,
              help=f"Comma-separated subset of {', '.join(GENERATORS[:3])}.")
@click.option("--no-kv-cache", is_flag=True, help="Also run the engine recomputing every sequence each step (slow).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the engine's decode step.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the ragged prompts and the sampling.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
def bench(model, quantize, device, batch_size, prompt_count, max_new_tokens, workload, generators, no_kv_cache,
          compile_, seed, as_json):
    """Measure the engine against transformers' generate (static batches) and continuous batching
    (generate_batch) on the same prompts: useful tokens/s, time to first token, padding waste, peak memory."""
    from shardgen.schemas.model import ModelSpec
    from shardgen.workers.engine import Engine
    from shardgen.workers.models.loader import load_model

    chosen = [g.strip() for g in generators.split(",") if g.strip()]
    unknown = set(chosen) - set(GENERATORS)
    if unknown:
        raise click.BadParameter(f"unknown generator(s) {', '.join(sorted(unknown))}", param_hint="--generators")
    if no_kv_cache and "engine-no-kv" not in chosen:
        chosen.append("engine-no-kv")
    spec = ModelSpec(model=model, quantize=quantize)
    loaded = load_model(spec, device)
    workloads = build_workloads(loaded.tokenizer, WORKLOADS if workload == "both" else (workload,), prompt_count,
                                max_new_tokens, seed)
    # The engine packs its model's weights in place, so transformers' generators get a plain copy of their own.
    plain = load_model(spec, device) if "engine" in chosen and set(chosen) & {"hf-generate", "hf-continuous"} else loaded
    runners: dict[str, Callable[[Workload], Measured]] = {}
    added_memory: dict[str, int] = {}
    if "engine" in chosen:
        engine = Engine(loaded, batch_size=batch_size, compile=compile_)
        runners["engine"] = lambda w: run_engine(engine, w)
        added_memory["engine"] = engine.packing.added_bytes if engine.packing else 0
    if "hf-generate" in chosen:
        runners["hf-generate"] = lambda w: run_hf_generate(plain, batch_size, w)
    if "hf-continuous" in chosen:
        runners["hf-continuous"] = lambda w: run_hf_continuous(plain.model, plain.tokenizer, w)
    if "engine-no-kv" in chosen:
        recompute = Engine(plain, batch_size=batch_size, use_kv_cache=False, pack_weights=False)
        runners["engine-no-kv"] = lambda w: run_engine(recompute, w)
    for copy in {id(loaded): loaded, id(plain): plain}.values():
        warm_up(copy)
    results = []
    for w in workloads:
        for name, run in runners.items():
            results.append(measure(name, w, loaded.device, lambda: run(w), added_memory.get(name, 0)))
            done = results[-1]
            click.echo(f"{w.name}/{name}: {done.note or f'{done.useful_tokens} tokens in {done.seconds:.1f}s'}", err=True)
    add_ratios(results)
    config = dict(model=model, quantize=quantize, device=loaded.device, batch_size=batch_size, prompts=prompt_count,
                  max_new_tokens=max_new_tokens, seed=seed, compile=compile_)
    if as_json:
        click.echo(json.dumps({"config": config, "results": [asdict(r) for r in results]}, indent=2))
    else:
        header = f"shardgen bench: {model} on {loaded.device}, batch {batch_size}, {prompt_count} prompts, " \
                 f"up to {max_new_tokens} new tokens"
        print_table(results, header)
