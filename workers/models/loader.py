"""Resolve a --model argument to a checkpoint and load it, quantized as asked, on one device."""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardgen.schemas.errors import InvalidParameter, ModelError, ModelNotFoundError
from shardgen.schemas.model import BNB_METHODS, ModelSpec

from .. import quantization
from . import default_model
from .adapters import Adapter, merge_adapter, read_adapter

log = logging.getLogger(__name__)


@dataclass
class ResolvedModel:
    source: str
    """Local directory or hub id handed to from_pretrained."""
    note: str | None = None
    """Something the user should be told about the choice (e.g. which checkpoint was picked)."""
    local: bool = True
    adapter: Adapter | None = None
    """A PEFT/LoRA adapter to serve over `source` (its base), when --model named an adapter directory."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    spec: ModelSpec
    device: str
    source: str
    load_time_s: float = 0.0
    eos_token_ids: tuple[int, ...] = ()
    context_length: int = 2048
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def footprint_bytes(self) -> int:
        return int(self.model.get_memory_footprint())


def resolve_model(name: str) -> ResolvedModel:
    """An alias, a checkpoint directory, a directory of checkpoints (latest wins), or a hub id."""
    if name.lower() in default_model.ALIASES:
        return ResolvedModel(str(default_model.default_checkpoint()))
    path = Path(name).expanduser()
    if path.is_dir() and (adapter := read_adapter(path)) is not None:
        if read_adapter(Path(adapter.base).expanduser()) is not None:
            raise ModelError(f"the base of adapter {path} is another adapter ({adapter.base})", "merge one of them first")
        base = resolve_model(adapter.base)
        return ResolvedModel(base.source, note=base.note, local=base.local, adapter=adapter)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedModel(str(path))
        candidates = [p for p in path.iterdir() if p.is_dir() and (p / "config.json").is_file()]
        if not candidates:
            raw = sorted(p.name for p in path.iterdir() if p.suffix.lower() in RAW_WEIGHT_SUFFIXES)
            if raw:
                raise _raw_weights_error(path / raw[0])
            raise ModelNotFoundError(
                f"{path} holds no checkpoint (no config.json in it or in a subdirectory)",
                "pass a directory written by save_pretrained, or a hub id",
            )
        latest = max(candidates, key=_checkpoint_order)
        note = f"{path} holds {len(candidates)} checkpoints; using the latest, {latest.name}"
        return ResolvedModel(str(latest), note=note)
    if path.is_file() and path.suffix.lower() == ".gguf":
        checkpoint, converted = quantization.gguf_checkpoint(path)
        return ResolvedModel(str(checkpoint), note=f"converted {path} once into {checkpoint}" if converted else None)
    if path.is_file() and (path.parent / "config.json").is_file():
        return ResolvedModel(str(path.parent), note=f"{path} is a file of the checkpoint in {path.parent}; loading that directory")
    if path.is_file() and path.suffix.lower() in RAW_WEIGHT_SUFFIXES:
        raise _raw_weights_error(path)
    if path.exists():
        raise ModelError(
            f"{path} is a file, not a checkpoint directory", "pass the directory that holds config.json, or a .gguf file"
        )
    looks_local = name.startswith((".", "/", "~")) or os.sep in name and not re.fullmatch(r"[\w.-]+/[\w.-]+", name)
    if looks_local or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise ModelNotFoundError(
            f"model {name!r} is neither a known alias, an existing directory nor a hub id",
            f"use --model {default_model.DEFAULT_MODEL_ALIAS}, a checkpoint directory, or owner/name from the hub",
        )
    return ResolvedModel(name, local=False)


RAW_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def _raw_weights_error(path: Path) -> ModelError:
    """A weights file without a transformers config: nothing says which architecture to build around it."""
    return ModelError(
        f"{path} is a raw PyTorch checkpoint with no transformers config (config.json), so no model can be built from it",
        "pass a directory written by save_pretrained (config.json and weights, e.g. after loading the state dict "
        "into a transformers model), or a .gguf file",
    )


def _checkpoint_order(path: Path) -> tuple[int, float]:
    match = re.search(r"(\d+)$", path.name)
    return (int(match.group(1)) if match else -1, path.stat().st_mtime)


def check_device(device: str | None) -> str:
    """The device to load on: `auto` (or None) picks the first GPU when there is one, else the CPU."""
    import torch

    if device is None or device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = "cuda:0"
    if device == "cpu":
        return device
    match = re.fullmatch(r"cuda:(\d+)", device)
    if not match:
        raise InvalidParameter(f"unknown device {device!r}", "use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ModelError(f"device {device} requested but no CUDA device is visible", "use --device cpu")
    if int(match.group(1)) >= torch.cuda.device_count():
        raise ModelError(f"device {device} does not exist ({torch.cuda.device_count()} visible)", "pick a lower index")
    return device


def bnb_config(spec: ModelSpec, compute_dtype: Any) -> Any:
    """transformers' BitsAndBytesConfig for a spec, or None when bitsandbytes is not asked for."""
    import torch
    from transformers import BitsAndBytesConfig

    if spec.quantize not in BNB_METHODS:
        return None
    fields = dict(spec.quantization_config)
    if spec.quantize == "int8":
        fields.update(load_in_8bit=True)
        fields.pop("load_in_4bit", None)
    else:
        fields.update(load_in_4bit=True, bnb_4bit_quant_type=spec.quantize)
        fields.pop("load_in_8bit", None)
        fields["bnb_4bit_compute_dtype"] = getattr(torch, fields.get("bnb_4bit_compute_dtype") or "", compute_dtype)
    return BitsAndBytesConfig(**fields)


def load_model(
    spec: ModelSpec, device: str | None = "auto", hf_token: str | None = None, *, tokenizer_source: str | None = None
) -> LoadedModel:
    """Load tokenizer and model once; the caller keeps the result for the life of its process.

    `tokenizer_source` takes the tokenizer from another directory or hub id than the model's own."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = check_device(device)
    quantization.refuse_unrunnable_method(spec, device)
    resolved = resolve_model(spec.model)
    if resolved.note:
        log.warning(resolved.note)
    if resolved.adapter is not None and spec.quantize != "none":
        raise ModelError(f"the adapter {resolved.adapter.path} is merged into its base at load, which --quantize "
                         f"{spec.quantize} would quantize first", "drop --quantize, or serve it with --engine vllm")
    # int8: float32 weights that shardgen's engine packs as int8 (workers/engine/weight_formats.py)
    dtype = {"auto": torch.bfloat16 if device.startswith("cuda") else torch.float32,
             "int8": torch.float32}.get(spec.dtype) or getattr(
        torch, spec.dtype
    )
    token = hf_token or os.environ.get("HF_TOKEN") or None
    offline = not resolved.local and not check_hub_reachable(resolved.source, spec.revision, token)
    resolved, checkpoint_method = _quantized_source(spec, resolved, device, token)
    common: dict[str, Any] = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code, "token": token}
    if offline:
        common["local_files_only"] = True  # the hub is out of reach, the model is in its cache
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source or tokenizer_home(resolved), **common)
        quant = bnb_config(spec, dtype)
        kwargs: dict[str, Any] = dict(common, dtype=dtype)
        if quant is not None:
            kwargs.update(quantization_config=quant)
        if quant is not None or checkpoint_method is not None:
            kwargs.update(device_map=device)
        model = AutoModelForCausalLM.from_pretrained(resolved.source, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        raise _load_error(spec.model, resolved, exc) from None
    if resolved.adapter is not None:
        model = merge_adapter(model, resolved.adapter)
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        device=device,
        source=resolved.source,
        load_time_s=time.perf_counter() - started,
        eos_token_ids=tuple(eos_ids),
        context_length=int(context),
        info=model_info(resolved, checkpoint_method),
    )


def tokenizer_home(resolved: ResolvedModel) -> str:
    """Where the tokenizer comes from: an adapter's own directory when it carries one (fine-tuning may add tokens),
    else the checkpoint's."""
    if resolved.adapter is not None and (Path(resolved.adapter.path) / "tokenizer_config.json").is_file():
        return resolved.adapter.path
    return resolved.source


def model_info(resolved: ResolvedModel, checkpoint_method: str | None) -> dict[str, Any]:
    """What a LoadedModel records of how it was found: a note for the user, the checkpoint's quantization, the
    adapter served over the base."""
    info: dict[str, Any] = {"note": resolved.note, "checkpoint_quantization": checkpoint_method,
                            "adapter": resolved.adapter.path if resolved.adapter else None}
    return {k: v for k, v in info.items() if v}


def _quantized_source(spec: ModelSpec, resolved: ResolvedModel, device: str, token: str | None) -> tuple[ResolvedModel, str | None]:
    """The checkpoint to load and how it is quantized already; GPTQ-calibrates it first when the spec asks."""
    checkpoint_method = quantization.checkpoint_quant_method(resolved.source, spec.revision, token)
    quantization.check_checkpoint_fits(spec, checkpoint_method, device)
    if spec.quantize != "gptq" or checkpoint_method is not None:
        return resolved, checkpoint_method
    calibrated = quantization.calibrated_checkpoint(resolved.source, spec, device)
    log.warning("serving the GPTQ checkpoint of %s calibrated into %s", spec.model, calibrated)
    return ResolvedModel(str(calibrated), note=f"GPTQ checkpoint calibrated into {calibrated}"), "compressed-tensors"


def check_hub_reachable(repo_id: str, revision: str | None, token: str | None) -> bool:
    """True when the hub answers for this model; False when it cannot be reached but the model is cached (load
    it from the cache); fails in a second, with one line, when it refuses us or the model is not cached.

    transformers would otherwise retry for over a minute before saying the same thing.
    """
    import huggingface_hub

    try:
        huggingface_hub.HfApi().model_info(repo_id, revision=revision, token=token, timeout=10)
    except (huggingface_hub.errors.RepositoryNotFoundError, huggingface_hub.errors.GatedRepoError):
        raise ModelNotFoundError(
            f"the hub has no model {repo_id} that this token may read",
            "check the name, or pass a token with --hf-token / HF_TOKEN for a private or gated model",
        ) from None
    except huggingface_hub.errors.RevisionNotFoundError:
        raise ModelError(f"model {repo_id} has no revision {revision}", "check --revision") from None
    except Exception as exc:  # network errors come in several types (httpx, OSError)
        if huggingface_hub.try_to_load_from_cache(repo_id, "config.json", revision=revision) is not None:
            return False
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelNotFoundError(
            f"cannot reach the Hugging Face hub for model {repo_id} ({reason})",
            "check the network, or pass a local checkpoint directory with --model",
        ) from None
    return True


def _load_error(name: str, resolved: ResolvedModel, exc: Exception) -> ModelError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if resolved.local:
        return ModelError(f"cannot load model {name} from {resolved.source}: {text}", "check the checkpoint directory")
    if any(s in str(exc) for s in ("401", "403", "gated", "private", "Unauthorized")):
        return ModelError(f"the hub refused access to {name}", "pass a token with --hf-token or HF_TOKEN")
    return ModelError(
        f"cannot fetch model {name} from the Hugging Face hub ({text})",
        "check the network and the name, or pass a local checkpoint directory with --model",
    )
