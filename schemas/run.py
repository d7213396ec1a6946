"""RunSpec: everything that defines a run, recorded once and shared by every shard of it."""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import InvalidParameter
from .model import ModelSpec
from .sampling import SamplingParams
from .shard import check_run_id


@dataclass(frozen=True)
class ColumnMapping:
    prompt_column: str | None = None
    """Column of plain-text prompts (default: prompt, question, instruction, input or text if present)."""
    messages_column: str | None = None
    """Column of chat message lists ([{"role", "content"}, ...]), instead of prompt_column."""
    system_prompt: str | None = None
    """A system prompt for every row."""
    system_column: str | None = None
    """Column with a per-row system prompt (overrides system_prompt)."""
    id_column: str | None = None
    """Column with row ids (default: the row index)."""
    keep_columns: tuple[str, ...] = ()
    """Input columns copied into the output."""
    output_column: str = "generation"
    """Name of the generated-text column."""
    ground_truth_column: str | None = None
    """Column with a reference answer, carried through as `ground_truth`."""
    params_column: str | None = None
    """Column of per-row requests: JSON objects of generation parameters over the run's (a row's own schema too)."""
    error_column: str | None = None
    """Column of per-row errors found while reading the input (an OpenAI batch request shardgen cannot honour):
    a row with one is recorded as failed, not generated."""
    adapter_column: str | None = None
    """Column naming each row's LoRA adapter directory (vLLM serves several over one base); empty: the base."""

    def __post_init__(self) -> None:
        if self.prompt_column and self.messages_column:
            raise InvalidParameter("give either a prompt column or a messages column, not both")
        keep = self.keep_columns
        if isinstance(keep, str):
            keep = tuple(c.strip() for c in keep.split(",") if c.strip())
        object.__setattr__(self, "keep_columns", tuple(keep))
        if not self.output_column or not isinstance(self.output_column, str):
            raise InvalidParameter("output column must be a non-empty name")
        reserved = set(RESULT_COLUMNS) - {"generation"}
        clash = ({self.output_column} | set(self.keep_columns)) & reserved
        if clash:
            raise InvalidParameter(f"column name(s) {sorted(clash)} are used by shardgen's output", "rename with --output-column or drop from --keep-columns")


RESULT_COLUMNS = (
    "id",
    "row_index",
    "ground_truth",
    "generation",
    "finish_reason",
    "prompt_tokens",
    "generated_tokens",
    "generation_time_s",
    "prompt_truncated",
    "error",
    "logprobs",
    "parsed",
)


INPUT_FORMATS = ("auto", "rows", "openai-batch")


@dataclass(frozen=True)
class RunSpec:
    input: str
    columns: ColumnMapping = field(default_factory=ColumnMapping)
    model: ModelSpec = field(default_factory=ModelSpec)
    params: SamplingParams = field(default_factory=SamplingParams)
    split: str | None = None
    subset: str | None = None
    """A hub dataset's subset (its config name, e.g. `main` for openai/gsm8k)."""
    revision: str | None = None
    """A hub dataset's revision: branch, tag or commit."""
    limit: int | None = None
    shard_size: int = 64
    chat_template: bool = True
    max_prompt_tokens: int | None = None
    max_retries: int = 3
    """Attempts after the first before a shard is marked failed."""
    input_format: str = "auto"
    """rows (a dataset of prompts), openai-batch (an OpenAI Batch API input file, converted to rows on reading),
    or auto: openai-batch for a JSONL file of that shape, else rows (decided when the input is read)."""
    run_id: str = ""
    created_at: float = 0.0
    base_seed: int = 0
    """The params' seed, or one drawn at creation: every row's seed derives from it, so retries repeat text."""

    def __post_init__(self) -> None:
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise InvalidParameter(f"shard_size must be a positive integer, got {self.shard_size!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise InvalidParameter(f"limit must be a positive integer, got {self.limit!r}")
        if self.max_prompt_tokens is not None and (not isinstance(self.max_prompt_tokens, int) or self.max_prompt_tokens < 1):
            raise InvalidParameter(f"max_prompt_tokens must be a positive integer, got {self.max_prompt_tokens!r}")
        if not isinstance(self.max_retries, int) or isinstance(self.max_retries, bool) or self.max_retries < 0:
            raise InvalidParameter(f"max_retries must be a non-negative integer, got {self.max_retries!r}")
        if self.input_format not in INPUT_FORMATS:
            raise InvalidParameter(f"unknown input format {self.input_format!r}", f"use one of {', '.join(INPUT_FORMATS)}")
        if not isinstance(self.chat_template, bool):
            raise InvalidParameter(f"chat_template must be true or false, got {self.chat_template!r}")
        if not self.run_id:
            object.__setattr__(self, "run_id", new_run_id())
        check_run_id(self.run_id)
        if not self.created_at:
            object.__setattr__(self, "created_at", time.time())
        if not self.base_seed:
            seed = self.params.seed if self.params.seed is not None else secrets.randbelow(2**31)
            object.__setattr__(self, "base_seed", seed)

    def row_seed(self, row_index: int) -> int:
        return row_seed(self.base_seed, row_index)

    @property
    def many_samples(self) -> bool:
        """Whether the output holds a list of samples per row (n > 1, or per-request n as in OpenAI batch files)."""
        return self.params.n > 1 or self.input_format == "openai-batch"

    def difference(self, other: "RunSpec") -> str | None:
        """The first setting that would make `other` produce different results than this run, or None."""
        checks = {
            "input": (self.input, other.input),
            "model": (self.model.model, other.model.model),
            "quantization": ((self.model.quantize, dict(self.model.quantization_config)), (other.model.quantize, dict(other.model.quantization_config))),
            "generation parameters": (_params_without_seed(self), _params_without_seed(other)),
            "seed": (self.params.seed, other.params.seed),
            "column mapping": (self.columns, other.columns),
            "shard size": (self.shard_size, other.shard_size),
            "dataset selection": ((self.subset, self.split, self.revision, self.limit), (other.subset, other.split, other.revision, other.limit)),
            "prompt settings": ((self.chat_template, self.max_prompt_tokens), (other.chat_template, other.max_prompt_tokens)),
            # "auto" is decided when the input is read: it matches whatever the recorded run decided
            "input format": (self.input_format, self.input_format if "auto" in (self.input_format, other.input_format)
                             else other.input_format),
        }
        for name, (mine, theirs) in checks.items():
            if mine != theirs:
                verbose = name not in ("column mapping", "generation parameters")
                return f"{name} ({mine} then {theirs})" if verbose else name
        return None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["columns"]["keep_columns"] = list(self.columns.keep_columns)
        out["model"] = self.model.to_dict()
        out["params"] = self.params.to_dict()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunSpec":
        data = dict(data)
        data["columns"] = ColumnMapping(**data.get("columns", {}))
        data["model"] = ModelSpec.from_mapping(data.get("model", {}))
        data["params"] = SamplingParams.from_mapping(data.get("params", {}))
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        return cls.from_dict(json.loads(text))


def row_seed(base_seed: int, row_index: int) -> int:
    """A row's seed depends only on the base seed and the row's input position (CLI, workers and API alike)."""
    return (base_seed * 1_000_003 + row_index * 7_919) % (2**63 - 1)


def _params_without_seed(spec: RunSpec) -> dict[str, Any]:
    params = spec.params.to_dict()
    params.pop("seed")
    return params


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
