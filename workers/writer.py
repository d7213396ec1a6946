"""The result table of a shard: one row per input row, its generation, and the run's metadata."""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import pyarrow as pa

from shardgen.schemas.results import meta_key
from shardgen.schemas.run import RunSpec
from shardgen.schemas.shard import InputRow

from .generation import FINISH_ERROR, GenerationOutput
from .prompts import PromptTokens


def result_table(
    spec: RunSpec,
    rows: Sequence[InputRow],
    outputs: Sequence[GenerationOutput],
    prompts: Sequence[PromptTokens | None],
    metadata: dict[str, str],
    input_types: Mapping[str, pa.DataType] | None = None,
    tokenizer: Any = None,
) -> pa.Table:
    """`input_types` (the Arrow types of copied input columns) keeps their type as it was in the input."""
    input_types = input_types or {}
    many = spec.many_samples
    text_type = pa.list_(pa.string()) if many else pa.string()
    generation, finish = [], []
    for output in outputs:
        texts = [s.text for s in output.samples]
        reasons = [s.finish_reason for s in output.samples]
        if output.error is not None:
            generation.append(None)
            finish.append([FINISH_ERROR] * spec.params.n if many else FINISH_ERROR)
        else:
            generation.append(texts if many else texts[0])
            finish.append(reasons if many else reasons[0])
    columns: dict[str, pa.Array] = {
        "id": pa.array([r.id for r in rows], pa.string()),
        "row_index": pa.array([r.index for r in rows], pa.int64()),
    }
    for name in spec.columns.keep_columns:
        columns[name] = _input_array([r.keep.get(name) for r in rows], input_types.get(name))
    if spec.columns.ground_truth_column:
        columns["ground_truth"] = _input_array([r.ground_truth for r in rows], input_types.get(spec.columns.ground_truth_column))
    columns[spec.columns.output_column] = pa.array(generation, text_type)
    columns["finish_reason"] = pa.array(finish, text_type)
    columns["prompt_tokens"] = pa.array([o.prompt_tokens for o in outputs], pa.int32())
    columns["generated_tokens"] = pa.array([o.generated_tokens for o in outputs], pa.int32())
    columns["generation_time_s"] = pa.array([o.generation_time_s for o in outputs], pa.float64())
    columns["prompt_truncated"] = pa.array([p is not None and p.truncated_from is not None for p in prompts], pa.bool_())
    columns["error"] = pa.array([o.row_error for o in outputs], pa.string())
    if spec.params.logprobs is not None or per_row_requests(spec):
        columns["logprobs"] = _logprobs_column(outputs, many)
    if has_parsed_column(spec):
        columns["parsed"] = _parsed_column(outputs, many)
    if spec.input_format == "openai-batch":
        chat = [r.keep.get("url") != "/v1/completions" for r in rows]
        columns["openai_logprobs"] = pa.array([openai_logprobs(o, tokenizer, c) for o, c in zip(outputs, chat)], pa.string())
    table = pa.table(columns)
    return table.replace_schema_metadata({meta_key(k): str(v).encode() for k, v in metadata.items()})


def openai_logprobs(output: GenerationOutput, tokenizer: Any, chat: bool) -> str | None:
    """A row's logprobs as the OpenAI API writes them, one object per sample (JSON text; None when not asked):
    chat completions' {"content": [{token, logprob, bytes, top_logprobs}]}, or completions' {tokens,
    token_logprobs, top_logprobs, text_offset}. Token texts need the tokenizer, so the worker writes them."""
    if output.error is not None or not output.samples or output.samples[0].logprobs is None or tokenizer is None:
        return None

    def text(token_id: int) -> str:
        return tokenizer.decode([token_id])

    objects = []
    for sample in output.samples:
        entries = sample.logprobs or []
        if chat:
            objects.append({"content": [{
                "token": text(e.token_id), "logprob": e.logprob, "bytes": list(text(e.token_id).encode()),
                "top_logprobs": [{"token": text(t), "logprob": v, "bytes": list(text(t).encode())}
                                 for t, v in zip(e.top_token_ids, e.top_logprobs)],
            } for e in entries], "refusal": None})
        else:
            tokens = [text(e.token_id) for e in entries]
            offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
            objects.append({"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                            "top_logprobs": [{text(t): v for t, v in zip(e.top_token_ids, e.top_logprobs)} for e in entries],
                            "text_offset": offsets})
    return json.dumps(objects, ensure_ascii=False)


def has_parsed_column(spec: RunSpec) -> bool:
    """Runs under a JSON schema get a `parsed` column: each text's value as JSON text (null when not whole)."""
    return spec.params.json_schema is not None or per_row_requests(spec)


def per_row_requests(spec: RunSpec) -> bool:
    """Rows may carry their own logprobs and schema: their columns are there for every row (null where unused)."""
    return spec.columns.params_column is not None


def _parsed_column(outputs: Sequence[GenerationOutput], many: bool) -> pa.Array:
    values = [None if o.error is not None else [s.parsed for s in o.samples] if many else o.samples[0].parsed
              for o in outputs]
    return pa.array(values, pa.list_(pa.string()) if many else pa.string())


def _input_array(values: list[Any], type_: pa.DataType | None) -> pa.Array:
    try:
        return pa.array(values, type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # e.g. text that is not valid UTF-8 in a string column
        return pa.array([None if v is None else v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values], pa.string())


LOGPROB_TYPE = pa.list_(pa.struct([
    ("token_id", pa.int32()), ("logprob", pa.float32()),
    ("top_token_ids", pa.list_(pa.int32())), ("top_logprobs", pa.list_(pa.float32())),
]))


def _logprobs_column(outputs: Sequence[GenerationOutput], many: bool) -> pa.Array:
    """Per generated token: its logprob and the top-K alternatives (a list per sample when n > 1)."""

    def of(sample: Any) -> list[dict[str, Any]] | None:
        if sample.logprobs is None:
            return None
        return [{"token_id": t.token_id, "logprob": t.logprob, "top_token_ids": list(t.top_token_ids),
                 "top_logprobs": list(t.top_logprobs)} for t in sample.logprobs]

    values = [None if o.error is not None else [of(s) for s in o.samples] if many else of(o.samples[0]) for o in outputs]
    return pa.array(values, pa.list_(LOGPROB_TYPE) if many else LOGPROB_TYPE)
