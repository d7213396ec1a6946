"""GGUF files: converted once into a plain checkpoint under the cache directory."""

from __future__ import annotations

from pathlib import Path

from shardgen.schemas.errors import ModelError

from ..models.default_model import cache_dir, convert_gguf
from .build_cache import build_once, short_hash


def gguf_cache_dir(path: Path) -> Path:
    """Where a GGUF file's converted checkpoint lives; a changed file (size or mtime) gets a new one."""
    path = path.expanduser().resolve()
    stat = path.stat()
    return cache_dir() / "models" / f"gguf-{short_hash(path, stat.st_size, stat.st_mtime_ns)}"


def gguf_checkpoint(path: Path) -> tuple[Path, bool]:
    """The plain checkpoint converted from a GGUF file, and whether this call converted it."""
    target = gguf_cache_dir(path)
    if (target / "config.json").is_file():
        return target, False
    build_once(target, lambda out: _convert_gguf_or_explain(path, out))
    return target, True


def _convert_gguf_or_explain(path: Path, target: Path) -> None:
    try:
        convert_gguf(path.expanduser().resolve(), target)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(
            f"cannot convert GGUF file {path}: {_first_line(exc)}",
            "transformers reads GGUF files of common architectures (llama, mistral, qwen2, gemma, phi3, ...); "
            "pass a checkpoint directory instead",
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
