"""ModelSpec: which model a run needs and how it is quantized. The worker's device is not part of it."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import InvalidParameter

QUANTIZE_METHODS = ("none", "nf4", "fp4", "int8")
DTYPES = ("auto", "float32", "bfloat16", "float16")

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


@dataclass(frozen=True)
class ModelSpec:
    model: str = "smollm2-135m"
    """Alias, local checkpoint directory (or a directory of checkpoints), or hub id."""
    quantize: str = "none"
    """none, nf4, fp4 or int8 (bitsandbytes)."""
    quantization_config: Mapping[str, Any] = field(default_factory=dict)
    """Fields of BitsAndBytesConfig; they refine `quantize` or imply it."""
    dtype: str = "auto"
    """Weights dtype: auto picks float32 on CPU and bfloat16 on CUDA."""
    revision: str | None = None
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise InvalidParameter("model must be a non-empty string", "pass --model smollm2-135m, a directory or a hub id")
        config = dict(self.quantization_config or {})
        for key, value in config.items():
            if key not in BNB_FIELDS:
                raise InvalidParameter(
                    f"unknown quantization_config field {key!r}", f"use one of {', '.join(BNB_FIELDS)}"
                )
            expected = BNB_FIELDS[key]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                config[key] = value
            if not isinstance(value, expected) or (expected is not bool and isinstance(value, bool)):
                raise InvalidParameter(f"quantization_config.{key} must be {expected.__name__}, got {value!r}")
        quantize = self.quantize if self.quantize is not None else "none"
        if isinstance(quantize, bool):
            quantize = "nf4" if quantize else "none"
        quantize = str(quantize).lower()
        if quantize == "none":
            if config.get("load_in_8bit"):
                quantize = "int8"
            elif config.get("load_in_4bit"):
                quantize = config.get("bnb_4bit_quant_type", "nf4")
        if quantize not in QUANTIZE_METHODS:
            raise InvalidParameter(f"unknown quantization {self.quantize!r}", f"use one of {', '.join(QUANTIZE_METHODS)}")
        if quantize in ("nf4", "fp4"):
            quant_type = config.get("bnb_4bit_quant_type", quantize)
            if quant_type not in ("nf4", "fp4"):
                raise InvalidParameter(f"bnb_4bit_quant_type must be nf4 or fp4, got {quant_type!r}")
            quantize = quant_type
        if quantize == "int8" and config.get("load_in_4bit") or quantize in ("nf4", "fp4") and config.get("load_in_8bit"):
            raise InvalidParameter(f"quantization_config contradicts quantize={quantize}", "set only one of 4-bit and 8-bit")
        compute = config.get("bnb_4bit_compute_dtype")
        if compute is not None and compute not in DTYPES[1:]:
            raise InvalidParameter(f"bnb_4bit_compute_dtype must be one of {', '.join(DTYPES[1:])}, got {compute!r}")
        if self.dtype not in DTYPES:
            raise InvalidParameter(f"unknown dtype {self.dtype!r}", f"use one of {', '.join(DTYPES)}")
        if not isinstance(self.trust_remote_code, bool):
            raise InvalidParameter(f"trust_remote_code must be true or false, got {self.trust_remote_code!r}")
        object.__setattr__(self, "quantize", quantize)
        object.__setattr__(self, "quantization_config", config)

    @property
    def slug(self) -> str:
        """A name safe for queue names and file names: model plus quantization."""
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", self.model.strip().rstrip("/")).strip("_")[-80:]
        return base if self.quantize == "none" else f"{base}@{self.quantize}"

    @property
    def queue(self) -> str:
        return f"sg.q.{self.slug}"

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
