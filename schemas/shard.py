"""Input rows, shards and the queue message that carries them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from .errors import MessageError

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class ShardState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class InputRow:
    """One dataset row, reduced to what generation needs plus what the output keeps."""

    index: int
    """Position in the input (after --limit); the collector orders by it."""
    id: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    system: str | None = None
    ground_truth: Any = None
    keep: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    """Set when the row cannot become a prompt (null or empty text, bad messages); it is recorded, not generated."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "id": self.id}
        for key in ("prompt", "messages", "system", "ground_truth", "error"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.keep:
            out["keep"] = self.keep
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "InputRow":
        if not isinstance(data, Mapping) or not isinstance(data.get("index"), int) or "id" not in data:
            raise MessageError(f"malformed row in message: {str(data)[:80]!r}")
        return cls(
            index=data["index"],
            id=str(data["id"]),
            prompt=data.get("prompt"),
            messages=data.get("messages"),
            system=data.get("system"),
            ground_truth=data.get("ground_truth"),
            keep=dict(data.get("keep") or {}),
            error=data.get("error"),
        )


@dataclass
class Shard:
    run_id: str
    index: int
    rows: list[InputRow]

    @property
    def name(self) -> str:
        return shard_file_name(self.index)


def shard_file_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def check_run_id(run_id: str) -> str:
    """Run ids become directory names: refuse anything that could leave the work directory."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.match(run_id):
        raise MessageError(f"invalid run id {str(run_id)[:80]!r}", "a run id is letters, digits, - and _ (at most 64)")
    return run_id


@dataclass
class ShardMessage:
    """The JSON body of one Celery task: small, self-contained, validated on the way in."""

    run_id: str
    shard_index: int
    rows: list[InputRow]
    attempt: int = 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "shard_index": self.shard_index,
            "attempt": self.attempt,
            "rows": json.loads(rows_to_json(self.rows)),
        }

    def shard(self) -> Shard:
        return Shard(self.run_id, self.shard_index, self.rows)

    @classmethod
    def from_dict(cls, data: Any) -> "ShardMessage":
        if not isinstance(data, Mapping):
            raise MessageError(f"shard message must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"run_id", "shard_index", "attempt", "rows"}
        if unknown:
            raise MessageError(f"shard message has unknown fields {sorted(unknown)}")
        index, attempt = data.get("shard_index"), data.get("attempt", 1)
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise MessageError(f"shard message has invalid shard_index {index!r}")
        if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
            raise MessageError(f"shard message has invalid attempt {attempt!r}")
        rows = data.get("rows")
        if not isinstance(rows, list):
            raise MessageError("shard message has no rows list")
        return cls(check_run_id(data.get("run_id")), index, [InputRow.from_dict(r) for r in rows], attempt)


def rows_to_json(rows: list[InputRow]) -> str:
    return json.dumps([r.to_dict() for r in rows], default=_json_default, ensure_ascii=False)


def rows_from_json(text: str) -> list[InputRow]:
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise MessageError(f"shard rows are not valid JSON: {exc}") from None
    if not isinstance(data, list):
        raise MessageError("shard rows must be a JSON list")
    return [InputRow.from_dict(item) for item in data]


def _json_default(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
