"""WorkerConfig: everything one worker process needs, built once from flags, TOML and the environment.

`shardgen worker` builds it; with `--devices`, the supervisor hands each child its own copy (device, metrics
port, name) in the child's environment. Only schemas are imported here: the supervisor never loads torch.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from shardgen.schemas.errors import InvalidParameter
from shardgen.schemas.model import ModelSpec
from shardgen.schemas.runtime import RuntimeOptions

CONFIG_ENV = "SHARDGEN_WORKER_CONFIG"
"""A supervised worker's WorkerConfig, as JSON. The environment, not argv: it holds the broker's password and the
hub token, which `ps` would show to every user of the host."""


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one worker process needs: the model it serves, how it runs it, where its broker is."""

    model: ModelSpec = field(default_factory=ModelSpec)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    broker: str | None = field(default=None, repr=False)
    """Redis URL (default: SHARDGEN_BROKER_URL, then redis://localhost:6379/0)."""
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    log_format: str = "text"
    loglevel: str = "INFO"
    name: str | None = None
    """Celery node name [default: shardgen-MODEL-DEVICE@HOST]."""
    storage_options: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def for_child(self, slot: int, device: str, label: str) -> "WorkerConfig":
        """The config of the supervisor's child number `slot` on `device` (cpu, or cuda:0 of the GPU it is pinned
        to), named after `label` (cpu, gpu3)."""
        return replace(
            self,
            runtime=self.runtime.replace(device=device),
            metrics_port=None if self.metrics_port is None else self.metrics_port + slot,
            name=f"shardgen-{slot}-{label}@{socket.gethostname()}",
        )

    def to_json(self) -> str:
        return json.dumps({
            "model": self.model.to_dict(), "runtime": self.runtime.to_dict(), "broker": self.broker,
            "metrics_port": self.metrics_port, "metrics_host": self.metrics_host, "log_format": self.log_format,
            "loglevel": self.loglevel, "name": self.name, "storage_options": dict(self.storage_options),
        })

    @classmethod
    def from_json(cls, text: str) -> "WorkerConfig":
        try:
            data = json.loads(text)
            return cls(**{**data, "model": ModelSpec.from_mapping(data["model"]),
                          "runtime": RuntimeOptions.from_dict(data["runtime"])})
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidParameter(f"{CONFIG_ENV} is not a worker config ({exc})", "start workers with `shardgen worker`") from None
