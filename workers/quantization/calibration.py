"""GPTQ calibration data, and the GPTQ checkpoint made once at load time (--quantize gptq with a dataset)."""

from __future__ import annotations

import json
from pathlib import Path

from shardgen.schemas.errors import InputError
from shardgen.schemas.model import ModelSpec

from ..models.default_model import cache_dir
from ..storage.datasets import load_dataset_table
from .build_cache import build_once, short_hash
from .gptq import DEFAULT_SAMPLES, GptqSettings, gptq_quantize_model

TEXT_COLUMN_GUESSES = ("text", "content", "prompt", "question", "instruction", "input")


def calibration_texts(dataset: str, text_column: str | None = None, samples: int = DEFAULT_SAMPLES) -> list[str]:
    """A fixed random sample (seed 0) of non-empty texts from one column of a dataset file or hub name."""
    table = load_dataset_table(dataset)
    column = text_column or next((c for c in TEXT_COLUMN_GUESSES if c in table.column_names), None)
    if column is None or column not in table.column_names:
        wanted = f"column {text_column!r}" if text_column else f"text column ({', '.join(TEXT_COLUMN_GUESSES)})"
        raise InputError(
            f"calibration dataset {dataset} has no {wanted}",
            f"pick one of {', '.join(table.column_names)} with --text-column",
        )
    table = table.shuffle(seed=0).select(range(min(samples, len(table))))
    texts = [value for value in table[column] if isinstance(value, str) and value.strip()]
    if not texts:
        raise InputError(f"column {column!r} of {dataset} holds no text", "pick a column of strings with --text-column")
    return texts


def calibrated_checkpoint(source: str, spec: ModelSpec, device: str) -> Path:
    """A GPTQ checkpoint of `source` made once from the calibration fields in the spec, cached by all of them."""
    config = spec.quantization_config
    key = short_hash(source, _mtime_of(source), json.dumps(dict(config), sort_keys=True))
    target = cache_dir() / "models" / f"gptq-{key}"

    def build(out: Path) -> None:
        texts = calibration_texts(config["dataset"], config.get("text_column"), config.get("samples", DEFAULT_SAMPLES))
        gptq_quantize_model(source, out, texts, GptqSettings.from_config(config), device)

    return build_once(target, build)


def _mtime_of(source: str) -> int:
    config = Path(source) / "config.json"
    return config.stat().st_mtime_ns if config.is_file() else 0
