"""GPTQ calibration data, and the GPTQ checkpoint made once at load time (--quantize gptq on a plain model).

Without a dataset, GPTQ calibrates on the sample shipped in data/calibration.txt (prose from the Python
Language Reference, PSF licence; data/README.md names its source): enough for 2- to 8-bit weights to work,
though a dataset from the model's own domain calibrates better.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from shardgen.schemas.errors import InputError
from shardgen.schemas.model import ModelSpec

from ..models.default_model import cache_dir
from ..storage.datasets import load_dataset_table
from .build_cache import build_once, short_hash
from .gptq import DEFAULT_SAMPLES, GptqSettings, gptq_quantize_model

log = logging.getLogger(__name__)

TEXT_COLUMN_GUESSES = ("text", "content", "prompt", "question", "instruction", "input")
BUILTIN_SAMPLE = Path(__file__).with_name("data") / "calibration.txt"
BUILTIN_SAMPLE_NAME = "shardgen's built-in sample (prose from the Python Language Reference, PSF licence)"
DOMAIN_NOTE = "a dataset from your own domain calibrates better: pass --dataset FILE"


def builtin_calibration_texts(samples: int = DEFAULT_SAMPLES) -> list[str]:
    """The first `samples` paragraphs of the shipped sample (one per sample; `#` lines are comments)."""
    text = BUILTIN_SAMPLE.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    paragraphs = [" ".join(block.split()) for block in "\n".join(lines).split("\n\n")]
    return [p for p in paragraphs if p][:samples]


def calibration_texts(
    dataset: str | None, text_column: str | None = None, samples: int = DEFAULT_SAMPLES
) -> list[str]:
    """A fixed random sample (seed 0) of non-empty texts from one column of a dataset file or hub name;
    without a dataset, the first `samples` paragraphs of the built-in sample."""
    if dataset is None:
        if text_column is not None:
            raise InputError(
                f"a text column ({text_column!r}) names a column of a calibration dataset, and none is given",
                "pass the dataset too (--dataset FILE), or drop the text column",
            )
        return builtin_calibration_texts(samples)
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
    parts = [source, _mtime_of(source), json.dumps(dict(config), sort_keys=True)]
    if "dataset" not in config:  # a later shardgen may ship another sample
        parts.append(hashlib.sha256(BUILTIN_SAMPLE.read_bytes()).hexdigest())
    key = short_hash(*parts)
    target = cache_dir() / "models" / f"gptq-{key}"

    def build(out: Path) -> None:
        samples = config.get("samples", DEFAULT_SAMPLES)
        texts = calibration_texts(config.get("dataset"), config.get("text_column"), samples)
        if "dataset" not in config:
            log.warning("calibrating GPTQ on %s; %s", BUILTIN_SAMPLE_NAME, DOMAIN_NOTE)
        gptq_quantize_model(source, out, texts, GptqSettings.from_config(config), device)

    return build_once(target, build)


def _mtime_of(source: str) -> int:
    config = Path(source) / "config.json"
    return config.stat().st_mtime_ns if config.is_file() else 0
