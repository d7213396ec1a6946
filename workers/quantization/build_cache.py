"""Checkpoints built once per machine (converted GGUF files, GPTQ calibrations), shared by every worker on it."""

from __future__ import annotations

import fcntl
import hashlib
from pathlib import Path
from typing import Any, Callable


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, built by `build(target)` unless a previous run (or another worker on this host) already did."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            build(target)
    return target


def short_hash(*parts: Any) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:16]
