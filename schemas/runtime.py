"""RuntimeOptions: how a process runs its model, as opposed to what a run asks for (RunSpec).

One validated object built once, from flags, the TOML file or the environment (in that order of precedence),
and handed to every driver: `run`, `worker` (and the children its supervisor starts), `bench` and the Python
API. Like SamplingParams it normalises on construction and refuses bad values with one line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import InvalidParameter

AUTO = "auto"
ENGINES = ("auto", "shardgen", "vllm", "hf-generate")
"""auto: vLLM on a CUDA device when it is installed, shardgen's engine otherwise. A `package.module:factory`
names a generator of your own (see workers/generators)."""
ENGINE_ALIASES = {"engine": "shardgen"}
DEFAULT_GRACE_SECONDS = 25.0
"""After SIGTERM, how long a worker lets its running shard go on before it gives it back to its queue."""
DEFAULT_STALL_SECONDS = 300.0
"""How long a running shard may go without a new token or finished row before its worker gives it up."""
DEFAULT_SHARDS_IN_FLIGHT = 2
"""Shards a worker runs at once: the next joins the engine's batch while the current one drains."""

ENVIRONMENT = {
    "device": "SHARDGEN_DEVICE",
    "engine": "SHARDGEN_ENGINE",
    "batch_size": "SHARDGEN_BATCH_SIZE",
    "max_memory": "SHARDGEN_MAX_MEMORY",
    "compile": "SHARDGEN_COMPILE",
    "hf_token": "HF_TOKEN",
    "grace_seconds": "SHARDGEN_GRACE_SECONDS",
    "stall_seconds": "SHARDGEN_STALL_SECONDS",
    "shards_in_flight": "SHARDGEN_SHARDS_IN_FLIGHT",
    "gpus_per_worker": "SHARDGEN_GPUS_PER_WORKER",
}
"""The environment variable of each option (read when neither a flag nor the TOML file gives it)."""


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = AUTO
    """cpu, cuda, cuda:N or auto (a GPU when there is one)."""
    engine: str = AUTO
    """Which generator runs the model: auto, shardgen, vllm, hf-generate, or package.module:factory."""
    batch_size: int | str = AUTO
    """Sequences decoded together, or auto: as many as the KV cache fits in max_memory."""
    max_memory: str | int | None = None
    """Memory budget of batch_size auto (8GiB, 6GB, bytes); default: what the device has free."""
    compile: bool = False
    """torch.compile the engine's decode step."""
    hf_token: str | None = field(default=None, repr=False)
    """Token for private hub models; never printed."""
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    stall_seconds: float = DEFAULT_STALL_SECONDS
    shards_in_flight: int = DEFAULT_SHARDS_IN_FLIGHT
    """Shards a worker holds at once (1: one at a time); more only where the engine takes requests mid-call."""
    gpus_per_worker: int = 1
    """GPUs one worker's model is split over (vLLM's tensor parallelism); the supervisor pins that many per child."""

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device.strip():
            raise InvalidParameter(f"device must be a name such as cpu, cuda:0 or auto, got {self.device!r}")
        object.__setattr__(self, "device", self.device.strip().lower())
        engine = ENGINE_ALIASES.get(str(self.engine).strip().lower(), str(self.engine).strip())
        if engine.lower() in ENGINES:
            engine = engine.lower()
        elif ":" not in engine:
            raise InvalidParameter(
                f"unknown engine {self.engine!r}", f"use one of {', '.join(ENGINES)}, or package.module:factory"
            )
        object.__setattr__(self, "engine", engine)
        object.__setattr__(self, "batch_size", parse_batch_size(self.batch_size))
        if self.max_memory is not None and (isinstance(self.max_memory, bool) or not str(self.max_memory).strip()):
            raise InvalidParameter(f"max_memory must be a size such as 8GiB, got {self.max_memory!r}")
        object.__setattr__(self, "compile", _boolean("compile", self.compile))
        object.__setattr__(self, "gpus_per_worker", _positive_int("gpus_per_worker", self.gpus_per_worker))
        for name in ("grace_seconds", "stall_seconds"):
            object.__setattr__(self, name, _seconds(name, getattr(self, name)))
        object.__setattr__(self, "shards_in_flight", _shards_in_flight(self.shards_in_flight))

    @classmethod
    def from_options(cls, options: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> "RuntimeOptions":
        """From merged flags and TOML options (canonical names; None means not given), then the environment."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, variable in ENVIRONMENT.items():
            value = options.get(name)
            if value is None and environ.get(variable) not in (None, ""):
                value = environ[variable]
            if value is not None:
                values[name] = value
        return cls(**values)

    def replace(self, **changes: Any) -> "RuntimeOptions":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every option, the token included: for a child process's environment, never for a log."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RuntimeOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidParameter(f"unknown runtime option(s) {', '.join(sorted(unknown))}", f"use {', '.join(sorted(known))}")
        return cls(**data)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise InvalidParameter(f"{name} must be a positive integer, got {value!r}")


def parse_batch_size(value: Any) -> int | str:
    """A positive number of sequences or "auto", from a flag, TOML or the environment."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        if text.isdigit():
            value = int(text)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise InvalidParameter(f"batch_size must be a positive integer or auto, got {value!r}", "pass e.g. 16 or auto")


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if not isinstance(value, bool):
        raise InvalidParameter(f"{name} must be true or false, got {value!r}")
    return value


def _seconds(name: str, value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise InvalidParameter(f"{name} must be a number of seconds, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(seconds) or seconds < 0:
        raise InvalidParameter(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return seconds


def _shards_in_flight(value: Any) -> int:
    try:
        number = int(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or not 1 <= number <= 8:
        raise InvalidParameter(f"shards_in_flight must be a whole number from 1 to 8, got {value!r}",
                               "pass --shards-in-flight 2 (the default) or 1 for one shard at a time")
    return number
