"""Input rows, shards and the queue message that asks a worker to take one."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import MessageError

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
"""Matched whole (fullmatch): `$` would also take a trailing newline."""
QUEUE_PATTERN = re.compile(r"[A-Za-z0-9._@+-]{1,200}")


@dataclass
class InputRow:
    """One dataset row, reduced to what generation needs plus what the output keeps."""

    index: int
    """Position in the input (after --limit); the collector orders by it."""
    id: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    system: str | None = None
    adapter: str | None = None
    """The LoRA adapter directory this row is served with (--adapter-column), None for the model as loaded."""
    ground_truth: Any = None
    keep: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] | None = None
    """The row's own generation parameters (its params column), over the run's; None for the run's."""
    error: str | None = None
    """Set when the row cannot become a prompt (null or empty text, bad messages); it is recorded, not generated."""


@dataclass
class Shard:
    run_id: str
    index: int
    rows: list[InputRow]
    input_types: dict[str, Any] = field(default_factory=dict)
    """Arrow types of the input columns copied into the output, so every shard's result has one schema."""


def check_run_id(run_id: str) -> str:
    """Run ids become directory names: refuse anything that could leave the work directory."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
        raise MessageError(f"invalid run id {str(run_id)[:80]!r}", "a run id is letters, digits, - and _ (at most 64)")
    return run_id


@dataclass(frozen=True)
class TakeShard:
    """The JSON body of one Celery task: "take the next shard waiting in this queue".

    It names no shard on purpose. Which shard runs next, and whether it may run at all, is decided by one atomic
    step of the run store when a worker claims it, so a message that is lost, duplicated or redelivered can
    neither lose nor double a shard: at worst a worker finds nothing to take.
    """

    queue: str

    def to_dict(self) -> dict[str, Any]:
        return {"queue": self.queue}

    @classmethod
    def from_dict(cls, data: Any) -> "TakeShard":
        if not isinstance(data, Mapping):
            raise MessageError(f"take-shard message must be a JSON object, got {type(data).__name__}")
        if set(data) != {"queue"}:
            raise MessageError(f"take-shard message must hold only a queue name, got fields {sorted(data)}")
        queue = data["queue"]
        if not isinstance(queue, str) or not QUEUE_PATTERN.fullmatch(queue):
            raise MessageError(f"take-shard message names an invalid queue {str(queue)[:80]!r}")
        return cls(queue)
