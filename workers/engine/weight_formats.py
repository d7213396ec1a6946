"""Which format the engine's linear weights take on this CPU: float32, bfloat16 or int8.

The machines this project runs on differ: some have AVX-512 BF16 (or AMX), whose bfloat16 matmuls run several
times faster than float32 ones, and VNNI, whose int8 dot products do too; some have AVX2 only. The engine packs
its linear layers once (packed_linear.py), in the format chosen here:

- `--dtype float32`, `bfloat16` or `int8` asks for one (a CPU without the instructions for it gets float32, and
  the log says so);
- `--dtype auto` keeps float32: bfloat16 and int8 are faster where the CPU has their instructions, but their greedy
  text drifts from float32's (see AUTO_REASON and `shardgen bench quant`), so they are asked for, not defaulted.

A model loaded in bfloat16 is packed in bfloat16 whatever the CPU (it has no float32 weights to keep).
"""

from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger(__name__)

FORMATS = ("float32", "bfloat16", "int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
AUTO_REASON = "auto: float32 (bfloat16 and int8 only when asked with --dtype)"
"""Why auto stays float32: with bfloat16 linear layers the engine's greedy text on the default model drifted from
float32's and from transformers' own bfloat16 (tests/test_api.py's "capital of France" answer); until that is
explained, the faster formats are the user's choice, not the default."""


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, as /proc/cpuinfo lists them (empty where there is no /proc)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_formats(flags: frozenset[str] | None = None) -> list[str]:
    """The formats this CPU multiplies with instructions of their own (float32 always)."""
    flags = cpu_flags() if flags is None else flags
    formats = ["float32"]
    if any(flag in flags for flag in BF16_FLAGS):
        formats.append("bfloat16")
    if any(flag in flags for flag in INT8_FLAGS):
        formats.append("int8")
    return formats


def choose_format(requested: str, model: torch.nn.Module, flags: frozenset[str] | None = None) -> tuple[str, str]:
    """The weight format for `requested` (auto, float32, bfloat16 or int8) on this CPU, and why."""
    dtype = next(model.parameters()).dtype
    if dtype == torch.bfloat16:
        return "bfloat16", "the model is loaded in bfloat16"
    if dtype != torch.float32:
        return str(dtype).removeprefix("torch."), "the model's own dtype"
    native = native_formats(flags)
    if requested == "auto":
        return "float32", AUTO_REASON
    if requested in ("bfloat16", "int8") and requested not in native:
        return "float32", f"{requested} asked, but this CPU lacks its instructions"
    return requested, "asked for"
