"""Memory the engine needs, what the process holds, and the largest batch a memory budget allows.

The KV cache is the engine's only allocation that grows with the batch: every slot holds keys and values for
every layer up to the longest sequence of a call. So `--batch-size auto` is a division: what the budget leaves
after the memory already in use (model, interpreter, libraries) and a reserve for a step's activations, over the
bytes one slot costs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from shardgen.schemas.errors import InvalidParameter

MAX_AUTO_BATCH = 256
"""Most slots `auto` chooses: past this a step's own working memory and latency grow with nothing to gain."""

STEP_RESERVE_BYTES = 256 * 2**20
"""Kept free beside the KV cache for a step's activations, logits and the allocator's slack."""

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_memory_size(text: str | int) -> int:
    """Bytes from `8GiB`, `8GB`, `512M`, `0.5g` or a plain number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        if not match or match.group(2).lower() not in _UNITS:
            raise InvalidParameter(f"max_memory must be a size such as 8GiB, 6GB or 512MiB, got {text!r}")
        value, unit = float(match.group(1)), match.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise InvalidParameter(f"max_memory must be more than 0 bytes, got {text!r}")
    return size


@dataclass(frozen=True)
class CacheLayout:
    """Shape of one layer's keys (or values) per slot and position: what a slot of the KV cache costs."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def slot_bytes(self, capacity: int) -> int:
        """Keys and values of one slot over `capacity` positions, all layers."""
        element = torch.empty((), dtype=self.dtype).element_size()
        return self.layers * 2 * self.kv_heads * capacity * self.head_dim * element

    def cache_bytes(self, slots: int, capacity: int) -> int:
        return slots * self.slot_bytes(capacity)


def fit_batch_size(budget_bytes: int, in_use_bytes: int, per_slot_bytes: int, reserve_bytes: int = STEP_RESERVE_BYTES,
                   limit: int = MAX_AUTO_BATCH) -> int:
    """The most slots whose memory fits the budget beside what is in use and a reserve; 0 if not even one."""
    free = budget_bytes - in_use_bytes - reserve_bytes
    if free < per_slot_bytes:
        return 0
    return min(limit, free // per_slot_bytes)


def process_rss_bytes() -> int:
    """Resident memory of this process now, as `ps` and the OOM killer see it."""
    rss = _proc_field_bytes("/proc/self/status", "VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:  # no /proc and no psutil: the peak is the best we can read
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_in_use(device: torch.device) -> int:
    """What counts against a budget on `device`: tensors allocated on a GPU, the whole process on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_reserved(device))
    return process_rss_bytes()


def default_budget(device: torch.device) -> int:
    """Without --max-memory: what this process holds plus what the device (GPU or system memory) has free.

    Several workers started together on one machine each see the same free memory: give each its share with
    --max-memory instead."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) + int(torch.cuda.memory_reserved(device))
    available = _proc_field_bytes("/proc/meminfo", "MemAvailable")
    if available is None:
        try:
            import psutil

            available = int(psutil.virtual_memory().available)
        except ImportError:
            raise InvalidParameter(
                "cannot tell how much memory this machine has free", "pass --max-memory or a fixed --batch-size"
            ) from None
    return process_rss_bytes() + available


def _proc_field_bytes(path: str, field: str) -> int | None:
    """A `Field:  N kB` line of a /proc file, in bytes (None without /proc)."""
    try:
        with open(path, encoding="ascii") as lines:
            for line in lines:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Restart the kernel's record of this process's peak RSS (Linux); False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """The kernel's record of this process's peak RSS since it started or since reset_peak_rss (Linux)."""
    return _proc_field_bytes("/proc/self/status", "VmHWM")
