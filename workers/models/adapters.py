"""PEFT/LoRA adapter directories (`adapter_config.json` naming a base model), as fine-tuning suites write them.

`--model ADAPTER_DIR` serves the base with the adapter: shardgen's engine and hf-generate merge it into the base at
load (peft's merge_and_unload), vLLM applies it as a LoRA request over the base it loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from shardgen.schemas.errors import ModelError

ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Adapter:
    path: str
    base: str
    """The base model as the adapter names it (`base_model_name_or_path`): an alias, directory or hub id."""
    rank: int
    peft_type: str


def read_adapter(path: Path) -> Adapter | None:
    """The adapter in directory `path`, or None when it holds none (a checkpoint has config.json)."""
    config_file = path / ADAPTER_CONFIG
    if not config_file.is_file() or (path / "config.json").is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_file} cannot be read ({exc})", "pass an adapter directory written by peft") from None
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        raise ModelError(f"{config_file} names no base model (base_model_name_or_path)",
                         "set it to the base model's directory or hub id")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ModelError(f"{path} is a {peft_type} adapter; shardgen serves LoRA adapters", "merge it into the base and pass that checkpoint")
    return Adapter(str(path), base, int(config.get("r") or 8), peft_type)


def merge_adapter(model, adapter: Adapter):
    """The base `model` with the adapter's weights merged in: a plain transformers model again."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelError("serving a PEFT adapter needs peft", "pip install peft") from None
    try:
        return PeftModel.from_pretrained(model, adapter.path).merge_and_unload()
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot apply the adapter {adapter.path} to {adapter.base}: {reason}",
                         "check that the adapter was trained on this base model") from None
