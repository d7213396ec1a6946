"""SamplingParams: the one validated object for how text is generated.

Shared by the CLI flags, the TOML file, the Python API, the queue message and the worker, so the rules
(defaults, aliases from other tools, validation) live here only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import InvalidParameter

# Names users bring from transformers' GenerationConfig, the OpenAI API and fine-tuning suites.
ALIASES = {
    "num_return_sequences": "n",
    "max_tokens": "max_new_tokens",
    "stop_sequences": "stop",
    "random_seed": "seed",
    "guided_json": "json_schema",  # vLLM's names for structured output
    "guided_regex": "regex",
    "guided_choice": "choice",
}

CONSTRAINTS = ("json_schema", "regex", "choice")
"""The fields that constrain a sample's text to a structure; at most one is set."""

MAX_LOGPROBS = 20
"""Most alternatives per token `logprobs` may ask for."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    """Most tokens generated per sample (EOS included)."""
    max_length: int | None = None
    """Cap on prompt + generated tokens, as in transformers; the tighter of this and max_new_tokens wins."""
    temperature: float = 0.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely one's (0 = off)."""
    repetition_penalty: float = 1.0
    """Divide positive logits (multiply negative ones) of tokens already seen by this (1 = off)."""
    stop: tuple[str, ...] = ()
    """Strings that end a sample; the text is cut before the first one."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a sample, besides the model's EOS."""
    n: int = 1
    """Samples per prompt."""
    seed: int | None = None
    """Base seed; each row derives its own from it, so a row's text does not depend on its batch."""
    num_beams: int = 1
    """Beam search width (1 = off); beam search runs through transformers' generate."""
    length_penalty: float = 1.0
    """Beam search: exponent on length when scoring finished beams."""
    early_stopping: bool = False
    """Beam search: stop when num_beams finished candidates exist."""
    ignore_eos: bool = False
    """Keep generating after EOS (for benchmarks)."""
    logprobs: int | None = None
    """Per generated token, its log-probability and the K most likely alternatives (0..20; None = off), from the
    model's raw logits before penalty, temperature and filters."""
    json_schema: str | None = None
    """A JSON Schema the text must be an instance of (given as an object or its JSON text; kept as JSON text,
    properties in the order given: the text writes them in that order). `{"type": "object"}` asks for any JSON
    object."""
    regex: str | None = None
    """A regular expression the whole text must match."""
    choice: tuple[str, ...] = ()
    """Strings the text must be exactly one of."""

    def __post_init__(self) -> None:
        _check_int(self, "max_new_tokens", minimum=1)
        if self.max_length is not None:
            _check_int(self, "max_length", minimum=1)
        _check_float(self, "temperature", minimum=0.0)
        _check_float(self, "top_p", minimum=0.0, maximum=1.0, open_low=True)
        _check_int(self, "top_k", minimum=0)
        _check_float(self, "min_p", minimum=0.0, maximum=1.0)
        _check_float(self, "repetition_penalty", minimum=0.0, open_low=True)
        _check_int(self, "n", minimum=1)
        _check_int(self, "num_beams", minimum=1)
        _check_float(self, "length_penalty")
        if self.seed is not None:
            _check_int(self, "seed", minimum=0)
        if self.logprobs is not None:
            _check_int(self, "logprobs", minimum=0)
            if self.logprobs > MAX_LOGPROBS:
                raise InvalidParameter(f"logprobs must be <= {MAX_LOGPROBS}, got {self.logprobs}")
            if self.num_beams > 1:
                raise InvalidParameter("logprobs cannot be combined with beam search", "leave num_beams at 1")
        for name in ("early_stopping", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidParameter(f"{name} must be true or false, got {getattr(self, name)!r}")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise InvalidParameter(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        ids = self.stop_token_ids
        if isinstance(ids, int) and not isinstance(ids, bool):
            ids = (ids,)
        if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
            raise InvalidParameter(f"stop_token_ids must be a list of non-negative integers, got {ids!r}")
        object.__setattr__(self, "stop_token_ids", tuple(ids))
        if self.num_beams > 1 and self.n > self.num_beams:
            raise InvalidParameter(f"n ({self.n}) cannot exceed num_beams ({self.num_beams}) with beam search")
        _normalize_constraint(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def constraint(self) -> tuple[str, str | tuple[str, ...]] | None:
        """(kind, value) of the structure the text must follow, e.g. ("json_schema", '{"type": "object"}'), or None.
        Generators map it to their own library (shardgen's engine and hf-generate: xgrammar)."""
        for kind in CONSTRAINTS:
            value = getattr(self, kind)
            if value:
                return kind, value
        return None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, source: str = "parameters") -> "SamplingParams":
        """Build from a dict of user-facing names, accepting aliases; unknown names are refused."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            if value is None:
                continue
            name = ALIASES.get(key, key)
            if name == "do_sample":
                continue
            if name == "use_cache":  # transformers' KV cache switch: the engine always caches, with the same tokens
                if not isinstance(value, bool):
                    raise InvalidParameter(f"use_cache must be true or false, got {value!r}")
                continue
            if name not in known:
                raise InvalidParameter(
                    f"unknown generation parameter {key!r} in {source}",
                    f"use one of {', '.join(sorted(known | set(ALIASES) | {'do_sample', 'use_cache'}))}",
                )
            kwargs[name] = value
        # transformers' do_sample: False means greedy whatever the temperature; True with no temperature means 1.
        if values.get("do_sample") is False:
            kwargs["temperature"] = 0.0
        elif values.get("do_sample") is True and kwargs.get("temperature", None) in (None, 0, 0.0):
            kwargs["temperature"] = 1.0
        return cls(**kwargs)

    def override(self, values: Mapping[str, Any], *, source: str = "parameters") -> "SamplingParams":
        """These parameters with `values` (user-facing names, aliases accepted) over them: a row's own request
        over the run's defaults. A constraint in `values` replaces this one's rather than combining with it."""
        if not isinstance(values, Mapping):
            raise InvalidParameter(f"{source} must be a JSON object of generation parameters, got {type(values).__name__}")
        base = self.to_dict()
        if any(ALIASES.get(k, k) in CONSTRAINTS for k in values):
            for kind in CONSTRAINTS:
                base.pop(kind)
        return SamplingParams.from_mapping({**base, **values}, source=source)

    def replace(self, **changes: Any) -> "SamplingParams":
        merged = {**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}}
        return SamplingParams.from_mapping(merged)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["stop"] = list(self.stop)
        out["stop_token_ids"] = list(self.stop_token_ids)
        out["choice"] = list(self.choice)
        return out  # json_schema stays JSON text: to_json sorts keys, and a schema's property order matters

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SamplingParams":
        return cls.from_mapping(json.loads(text))

    def new_token_budget(self, prompt_tokens: int) -> int:
        """New tokens this prompt may get under both max_new_tokens and max_length."""
        if self.max_length is None:
            return self.max_new_tokens
        return max(0, min(self.max_new_tokens, self.max_length - prompt_tokens))


def _normalize_constraint(params: SamplingParams) -> None:
    """JSON schema to canonical JSON text, choice to a tuple; a regex must compile; at most one constraint."""
    schema = params.json_schema
    if schema is not None:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidParameter(f"json_schema is not valid JSON ({exc})", "give a JSON Schema object") from None
        if not isinstance(schema, dict):
            raise InvalidParameter(f"json_schema must be a JSON object, got {type(schema).__name__}",
                                   'give a JSON Schema object such as {"type": "object"}')
        # Not sorted: a schema's property order is the order the text writes them in.
        object.__setattr__(params, "json_schema", json.dumps(schema, ensure_ascii=False))
    if params.regex is not None:
        if not isinstance(params.regex, str) or not params.regex:
            raise InvalidParameter(f"regex must be a non-empty string, got {params.regex!r}")
        try:
            re.compile(params.regex)
        except re.error as exc:
            raise InvalidParameter(f"regex {params.regex!r} does not compile ({exc})", "fix the regular expression") from None
    choice = params.choice
    if isinstance(choice, str):
        choice = (choice,)
    if not isinstance(choice, (list, tuple)) or not all(isinstance(c, str) and c for c in choice):
        raise InvalidParameter(f"choice must be a list of non-empty strings, got {params.choice!r}")
    object.__setattr__(params, "choice", tuple(dict.fromkeys(choice)))
    given = [kind for kind in CONSTRAINTS if getattr(params, kind)]
    if len(given) > 1:
        raise InvalidParameter(f"{' and '.join(given)} cannot be combined", "constrain the text with one of them")
    if given and params.num_beams > 1:
        raise InvalidParameter(f"{given[0]} cannot be combined with beam search", "leave num_beams at 1")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(params: SamplingParams, name: str, minimum: int | None = None) -> None:
    value = getattr(params, name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
        object.__setattr__(params, name, value)
    if not _is_int(value):
        raise InvalidParameter(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise InvalidParameter(f"{name} must be >= {minimum}, got {value}")


def _check_float(
    params: SamplingParams,
    name: str,
    minimum: float | None = None,
    maximum: float | None = None,
    open_low: bool = False,
) -> None:
    value = getattr(params, name)
    if _is_int(value):
        value = float(value)
        object.__setattr__(params, name, value)
    if not isinstance(value, float) or value != value:
        raise InvalidParameter(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidParameter(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (value < minimum or (open_low and value == minimum)):
        bound = f"> {minimum:g}" if open_low else f">= {minimum:g}"
        raise InvalidParameter(f"{name} must be {bound}, got {value:g}")
    if maximum is not None and value > maximum:
        raise InvalidParameter(f"{name} must be <= {maximum:g}, got {value:g}")
