"""ModelSpec: which model a run needs and how it is quantized. The worker's device is not part of it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import InvalidParameter

QUANTIZE_METHODS = ("none", "nf4", "fp4", "int8", "gptq", "awq")
BNB_METHODS = ("nf4", "fp4", "int8")
DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")
"""int8: the engine's linear weights in int8 on a CPU with VNNI (loaded as float32 for other generators)."""
GPTQ_BITS = (2, 3, 4, 8)
PINNED_ENGINES = ("shardgen", "vllm", "hf-generate")
"""Engines a run may ask for by name (`submit --engine`); a run that names none is served by any engine."""
IDENTITY_FIELDS = ("model", "revision", "dtype", "quantize", "quantization_config", "engine")
"""What makes two workers' weights the same weights: these decide the queue, and a worker checks them on claim."""
SLUG_LENGTH = 80
METHOD_FIELDS = ("load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type")
"""quantization_config fields that say no more than the method they imply."""

# Fields of transformers' BitsAndBytesConfig a user may write in a `quantization_config` table.
BNB_FIELDS = {
    "load_in_4bit": bool,
    "load_in_8bit": bool,
    "bnb_4bit_quant_type": str,
    "bnb_4bit_use_double_quant": bool,
    "bnb_4bit_compute_dtype": str,
    "bnb_4bit_quant_storage": str,
    "llm_int8_threshold": float,
    "llm_int8_skip_modules": list,
    "llm_int8_enable_fp32_cpu_offload": bool,
}
# GPTQ calibration fields: those of transformers' GPTQConfig (bits, group_size, dataset, damp_percent) plus which
# text column and how many rows of the dataset to calibrate on.
GPTQ_FIELDS = {
    "bits": int,
    "group_size": int,
    "dataset": str,
    "text_column": str,
    "samples": int,
    "damp_percent": float,
}
QUANTIZATION_FIELDS = {**BNB_FIELDS, **GPTQ_FIELDS}


@dataclass(frozen=True)
class ModelSpec:
    model: str = "smollm2-135m"
    """Alias, local checkpoint directory (or a directory of checkpoints), GGUF file, or hub id."""
    quantize: str = "none"
    """none (or auto: as the checkpoint says), nf4, fp4, int8 (bitsandbytes), gptq or awq (pre-quantized)."""
    quantization_config: Mapping[str, Any] = field(default_factory=dict)
    """Fields of BitsAndBytesConfig or GPTQ calibration fields; they refine `quantize` or imply it."""
    dtype: str = "auto"
    """Weights dtype: auto picks bfloat16 on CUDA; on a CPU float32, with the engine's linear layers in bfloat16
    where the CPU has BF16 instructions (workers/engine/weight_formats.py)."""
    revision: str | None = None
    trust_remote_code: bool = False
    engine: str | None = None
    """The generator the run pins (one of PINNED_ENGINES), or None: any."""

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidParameter("model must be a non-empty string", "pass --model smollm2-135m, a directory or a hub id")
        config = _typed_fields(self.quantization_config or {})
        quantize = _method(self.quantize, config)
        _check_fields_fit_method(quantize, config)
        if self.dtype not in DTYPES:
            raise InvalidParameter(f"unknown dtype {self.dtype!r}", f"use one of {', '.join(DTYPES)}")
        if not isinstance(self.trust_remote_code, bool):
            raise InvalidParameter(f"trust_remote_code must be true or false, got {self.trust_remote_code!r}")
        if self.engine is not None and self.engine not in PINNED_ENGINES:
            raise InvalidParameter(f"a run cannot ask for engine {self.engine!r}", f"use one of {', '.join(PINNED_ENGINES)}")
        object.__setattr__(self, "quantize", quantize)
        object.__setattr__(self, "quantization_config", config)

    @property
    def identity(self) -> dict[str, Any]:
        """The weights this spec loads and how they run: equal identities give the same results."""
        values = self.to_dict()
        # Fields that only restate the method (load_in_4bit with nf4) change nothing.
        values["quantization_config"] = {k: v for k, v in values["quantization_config"].items() if k not in METHOD_FIELDS}
        return {name: values[name] for name in IDENTITY_FIELDS}

    @property
    def slug(self) -> str:
        """A name safe for queue names and file names: model plus quantization, plus a digest of the rest of the
        identity (revision, dtype, quantization config, engine) when any of it is set or the name was cut."""
        full = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model.strip().rstrip("/")).strip("_")
        base = full[-SLUG_LENGTH:]
        slug = base if self.quantize == "none" else f"{base}@{self.quantize}"
        rest = {k: v for k, v in self.identity.items() if k not in ("model", "quantize")}
        if rest != {"revision": None, "dtype": "auto", "quantization_config": {}, "engine": None} or base != full:
            digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:10]
            slug = f"{slug}+{digest}"
        return slug

    @property
    def queue(self) -> str:
        """The Redis list of shards waiting for workers of exactly this identity (the run store's)."""
        return f"sg.q.{self.slug}"

    def worker_flags(self) -> str:
        """The `shardgen worker` flags that serve this spec's queue."""
        flags = [f"--model {self.model}"]
        if self.quantize != "none":
            flags.append(f"--quantize {self.quantize}")
        if self.quantization_config:
            flags.append(f"--quantization-config '{json.dumps(dict(self.quantization_config), sort_keys=True)}'")
        if self.dtype != "auto":
            flags.append(f"--dtype {self.dtype}")
        if self.revision:
            flags.append(f"--model-revision {self.revision}")
        if self.engine:
            flags.append(f"--engine {self.engine}")
        return " ".join(flags)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["quantization_config"] = dict(self.quantization_config)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ModelSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise InvalidParameter(f"unknown model field(s) {', '.join(sorted(unknown))}", f"use {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in values.items() if v is not None})


def pinned_engine(engine: str | None) -> str | None:
    """The engine a worker started with `--engine` puts in its identity: a named one; auto and a
    package.module:factory of your own serve the runs that pin none."""
    return engine if engine in PINNED_ENGINES else None


def identity_difference(wanted: Mapping[str, Any], served: Mapping[str, Any]) -> str | None:
    """How the weights a worker serves differ from those a run wants ('revision main, the run wants v2'), or None."""
    differences = [
        f"{name} {served.get(name) or 'none'}, the run wants {wanted.get(name) or 'none'}"
        for name in IDENTITY_FIELDS if (wanted.get(name) or None) != (served.get(name) or None)
    ]
    return "; ".join(differences) or None


def _typed_fields(raw: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise InvalidParameter(f"quantization_config must be a mapping of fields, got {raw!r}")
    config = dict(raw)
    for key, value in config.items():
        if key not in QUANTIZATION_FIELDS:
            raise InvalidParameter(
                f"unknown quantization_config field {key!r}", f"use one of {', '.join(QUANTIZATION_FIELDS)}"
            )
        expected = QUANTIZATION_FIELDS[key]
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = config[key] = float(value)
        if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
            raise InvalidParameter(f"quantization_config.{key} must be {expected.__name__}, got {value!r}")
    return config


def _method(quantize: Any, config: Mapping[str, Any]) -> str:
    """The quantization method `quantize` names, or the one the config fields imply when it says none."""
    if quantize is None:
        quantize = "none"
    if isinstance(quantize, bool):
        quantize = "nf4" if quantize else "none"
    method = str(quantize).lower()
    if method == "auto":
        method = "none"
    if method == "none":
        if config.get("load_in_8bit"):
            method = "int8"
        elif config.get("load_in_4bit"):
            method = config.get("bnb_4bit_quant_type", "nf4")
        elif any(key in GPTQ_FIELDS for key in config):
            method = "gptq"
    if method not in QUANTIZE_METHODS:
        raise InvalidParameter(f"unknown quantization {quantize!r}", f"use one of {', '.join(QUANTIZE_METHODS)}")
    if method in ("nf4", "fp4"):
        method = config.get("bnb_4bit_quant_type", method)
        if method not in ("nf4", "fp4"):
            raise InvalidParameter(f"bnb_4bit_quant_type must be nf4 or fp4, got {method!r}")
    return method


def _check_fields_fit_method(method: str, config: Mapping[str, Any]) -> None:
    bnb = sorted(key for key in config if key in BNB_FIELDS)
    gptq = sorted(key for key in config if key in GPTQ_FIELDS)
    misplaced = gptq if method in BNB_METHODS else bnb if method == "gptq" else bnb + gptq if method == "awq" else []
    if misplaced:
        raise InvalidParameter(
            f"quantization_config field(s) {', '.join(misplaced)} do not apply to quantize={method}",
            "bitsandbytes fields go with nf4, fp4 or int8; bits, group_size, dataset, text_column, samples and "
            "damp_percent with gptq; awq checkpoints take none",
        )
    if method == "int8" and config.get("load_in_4bit") or method in ("nf4", "fp4") and config.get("load_in_8bit"):
        raise InvalidParameter(f"quantization_config contradicts quantize={method}", "set only one of 4-bit and 8-bit")
    compute = config.get("bnb_4bit_compute_dtype")
    if compute is not None and compute not in FLOAT_DTYPES:
        raise InvalidParameter(f"bnb_4bit_compute_dtype must be one of {', '.join(FLOAT_DTYPES)}, got {compute!r}")
    if method == "gptq":
        _check_gptq_fields(config)


def _check_gptq_fields(config: Mapping[str, Any]) -> None:
    if config.get("bits", 4) not in GPTQ_BITS:
        raise InvalidParameter(f"GPTQ bits must be one of {', '.join(map(str, GPTQ_BITS))}, got {config['bits']}")
    group_size = config.get("group_size", 128)
    if group_size != -1 and (group_size < 1 or group_size & (group_size - 1)):
        raise InvalidParameter(
            f"GPTQ group_size must be a power of two or -1 (one scale per output row), got {group_size}",
            "use 128, 64 or 32",
        )
    if config.get("samples", 1) < 1:
        raise InvalidParameter(f"GPTQ samples must be >= 1, got {config['samples']}")
    if not 0 < config.get("damp_percent", 0.01) < 1:
        raise InvalidParameter(f"GPTQ damp_percent must be in (0, 1), got {config['damp_percent']}", "use 0.01")
