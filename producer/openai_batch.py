"""OpenAI Batch API files: an input file of requests becomes rows with their own parameters; results become
the Batch API's output file (and its errors file).

Input: one JSON object per line, `{"custom_id", "method": "POST", "url", "body"}`, the url
`/v1/chat/completions` (messages through the model's chat template) or `/v1/completions` (the prompt as it is),
one of them per file as OpenAI requires. Each body's fields are that row's request (SamplingParams):

    max_tokens, max_completion_tokens -> max_new_tokens     temperature, top_p, n, seed, stop -> the same
    logprobs + top_logprobs (chat), logprobs N (completions) -> logprobs
    response_format {"type": "json_object"} -> json_schema {"type": "object"}
    response_format {"type": "json_schema", "json_schema": {"schema": ...}} -> json_schema
    top_k, min_p, repetition_penalty (vLLM's extensions) -> the same

Fields left at OpenAI's defaults (stream false, presence and frequency penalty 0, ...) are accepted; any other
field, a body whose `model` is not the run's, or a malformed line is that request's error, not the file's.
Fields a body leaves out take the run's values (flags or TOML), not OpenAI's defaults (its temperature is 1).

Output: one line per request, in input order, `{"id", "custom_id", "response": {"status_code": 200,
"request_id", "body": chat.completion | text_completion}, "error": null}`, or `response: null` and
`error: {"code", "message"}` for a request that failed; failed requests are also written to the errors file.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from typing import IO, Any, Iterable, Mapping

import pyarrow as pa

from shardgen.schemas.errors import InputError, InvalidParameter
from shardgen.schemas.run import ColumnMapping, RunSpec

FORMAT = "openai-batch"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
ENDPOINTS = (CHAT, COMPLETIONS)

RENAMED = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "temperature": "temperature",
           "top_p": "top_p", "n": "n", "seed": "seed", "stop": "stop", "top_k": "top_k", "min_p": "min_p",
           "repetition_penalty": "repetition_penalty"}
DEFAULTS_ACCEPTED = {"stream": (False, None), "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None),
                     "echo": (False, None), "suffix": (None,), "logit_bias": (None, {}), "parallel_tool_calls": (None,),
                     "tool_choice": (None, "none"), "tools": (None, [])}
IGNORED = {"user", "metadata", "store", "service_tier"}
"""Fields that change nothing shardgen generates."""

COLUMNS = ("custom_id", "url", "model", "messages", "prompt", "params", "request_error")


# ---------------------------------------------------------------- input


def looks_like_batch_file(first_line: str) -> bool:
    """Whether a JSONL file's first record has the Batch API's shape (custom_id, url, body)."""
    try:
        record = json.loads(first_line)
    except ValueError:
        return False
    return isinstance(record, dict) and {"custom_id", "body"} <= set(record) and ("url" in record or "method" in record)


def read_batch_file(lines: Iterable[str], spec: RunSpec) -> tuple[RunSpec, pa.Table]:
    """The run's spec for a batch file (its columns, chat template on for chat requests) and one row per request."""
    records: list[dict[str, Any]] = []
    endpoint: str | None = None
    seen_ids: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = request_row(line, number, spec, endpoint, seen_ids)
        if row["request_error"] is None and endpoint is None:
            endpoint = row["url"]
        records.append(row)
    if not records:
        raise InputError(f"{spec.input} holds no requests", "pass an OpenAI batch file with one request per line")
    endpoint = endpoint or CHAT
    for row in records:  # rows read before the first valid one could not know the file's endpoint
        if row["request_error"] is None and row["url"] != endpoint:
            row["request_error"] = _other_endpoint(row["url"], endpoint)
    chat = endpoint == CHAT
    columns = ColumnMapping(
        messages_column="messages" if chat else None, prompt_column=None if chat else "prompt", id_column="custom_id",
        params_column="params", error_column="request_error", keep_columns=("url", "model"),
        output_column=spec.columns.output_column,
    )
    table = pa.Table.from_pylist(records, schema=pa.schema([(name, pa.string()) for name in COLUMNS]))
    return replace(spec, columns=columns, input_format=FORMAT, chat_template=chat and spec.chat_template), table


def request_row(line: str, number: int, spec: RunSpec, endpoint: str | None, seen_ids: set[str]) -> dict[str, Any]:
    """One request line as a row; what is wrong with it goes to its request_error."""
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row["custom_id"] = f"line-{number}"
    try:
        record = json.loads(line)
    except ValueError as exc:
        row["request_error"] = f"line {number} is not JSON ({exc})"
        return row
    if not isinstance(record, dict):
        row["request_error"] = f"line {number} is not a JSON object"
        return row
    custom_id = record.get("custom_id")
    if isinstance(custom_id, str) and custom_id and custom_id not in seen_ids:
        row["custom_id"] = custom_id
        seen_ids.add(custom_id)
    row["url"] = record.get("url")
    row["model"] = (record.get("body") or {}).get("model") if isinstance(record.get("body"), dict) else None
    try:
        if not isinstance(custom_id, str) or not custom_id:
            raise InvalidParameter("custom_id must be a non-empty string")
        if row["custom_id"] != custom_id:
            raise InvalidParameter(f"custom_id {custom_id!r} is used by an earlier request", "give each request its own")
        if record.get("method", "POST") != "POST":
            raise InvalidParameter(f"method must be POST, got {record.get('method')!r}")
        if row["url"] not in ENDPOINTS:
            raise InvalidParameter(f"url {row['url']!r} is not supported", f"use {CHAT} or {COMPLETIONS}")
        if endpoint is not None and row["url"] != endpoint:
            raise InvalidParameter(_other_endpoint(row["url"], endpoint))
        body = record.get("body")
        if not isinstance(body, dict):
            raise InvalidParameter("body must be a JSON object")
        check_model(body.get("model"), spec.model.model)
        params = body_params(body, row["url"])
        spec.params.override(params, source="the request")  # invalid values fail the row here, with one line
        row["params"] = json.dumps(params)
        if row["url"] == CHAT:
            row["messages"] = json.dumps(chat_messages(body.get("messages")))
        else:
            row["prompt"] = completion_prompt(body.get("prompt"))
    except InvalidParameter as exc:
        row["request_error"] = exc.line()
    return row


def _other_endpoint(url: str, endpoint: str) -> str:
    return f"url {url} differs from this file's {endpoint}: one endpoint per batch file, as OpenAI requires"


def model_names(model: str) -> set[str]:
    """The names a body's `model` may give for the run's model: as given, its last path part, and for the
    default model its aliases and hub id."""
    from shardgen.workers.models import default_model

    names = {model.lower(), model.rstrip("/").rsplit("/", 1)[-1].lower()}
    if names & default_model.ALIASES:
        names |= default_model.ALIASES | {"huggingfacetb/smollm2-135m-instruct", "smollm2-135m-instruct"}
    return names


def check_model(requested: Any, run_model: str) -> None:
    if not isinstance(requested, str) or not requested:
        raise InvalidParameter("body.model must be a model name", f"this run serves {run_model}")
    if requested.lower() not in model_names(run_model):
        raise InvalidParameter(f"body.model {requested!r} is not this run's model {run_model!r}",
                               f"run this request with --model {requested}, or change its model to {run_model}")


def body_params(body: Mapping[str, Any], url: str) -> dict[str, Any]:
    """A body's fields as SamplingParams names; a field shardgen cannot honour raises InvalidParameter."""
    params: dict[str, Any] = {}
    for key, value in body.items():
        if key in ("model", "messages" if url == CHAT else "prompt") or key in IGNORED:
            continue
        if key in RENAMED:
            if value is not None:
                params[RENAMED[key]] = value
        elif key == "logprobs":
            _logprobs(params, body, url)
        elif key == "top_logprobs" and url == CHAT:
            continue  # read with logprobs
        elif key == "response_format":
            params.update(response_format(value))
        elif key == "best_of" and value in (None, body.get("n", 1)):
            continue
        elif key in DEFAULTS_ACCEPTED and value in DEFAULTS_ACCEPTED[key]:
            continue
        else:
            raise InvalidParameter(f"body field {key!r} is not supported by shardgen",
                                   "remove it (supported: " + ", ".join(sorted({*RENAMED, "logprobs", "top_logprobs",
                                                                              "response_format"})) + ")")
    if url == CHAT and body.get("top_logprobs") is not None and not body.get("logprobs"):
        raise InvalidParameter("top_logprobs needs logprobs: true", "set logprobs to true")
    return params


def _logprobs(params: dict[str, Any], body: Mapping[str, Any], url: str) -> None:
    value = body["logprobs"]
    if url == CHAT:
        if not isinstance(value, bool) and value is not None:
            raise InvalidParameter(f"logprobs must be true or false for chat completions, got {value!r}")
        if value:
            params["logprobs"] = body.get("top_logprobs") or 0
    elif value is not None:
        params["logprobs"] = value


def response_format(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise InvalidParameter(f"response_format {json.dumps(value)[:80]} is not supported",
                               'use {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}')
    if value["type"] == "text":
        return {}
    if value["type"] == "json_object":
        return {"json_schema": {"type": "object"}}
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise InvalidParameter("response_format json_schema needs a json_schema object with a schema")
    return {"json_schema": spec["schema"]}


def chat_messages(messages: Any) -> list[dict[str, str]]:
    """Messages with text content (a string, or a list of text parts joined)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidParameter("body.messages must be a non-empty list of messages")
    out = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidParameter("each message needs a role and a content")
        content = message.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise InvalidParameter("only text content parts are supported", "send images and audio elsewhere")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InvalidParameter(f"message content must be text, got {type(content).__name__}")
        out.append({"role": message["role"], "content": content})
    return out


def completion_prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise InvalidParameter("body.prompt must be one non-empty string", "send one prompt per request")
    return prompt


# ---------------------------------------------------------------- output


def _short_hash(*parts: Any) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:24]


def response_line(row: Mapping[str, Any], run_id: str, created: int) -> dict[str, Any]:
    """One output line for a result row (a row of the results table of an openai-batch run)."""
    custom_id = row["id"]
    line_id = f"batch_req_{_short_hash(run_id, custom_id)}"
    texts = row.get("generation")
    if texts is None:
        return {"id": line_id, "custom_id": custom_id, "response": None,
                "error": {"code": "invalid_request", "message": row.get("error") or "the request failed"}}
    chat = row.get("url") == CHAT
    reasons = row.get("finish_reason") or []
    logprobs = json.loads(row["openai_logprobs"]) if row.get("openai_logprobs") else [None] * len(texts)
    choices = []
    for index, (text, reason, lp) in enumerate(zip(texts, reasons, logprobs)):
        choice: dict[str, Any] = {"index": index, "finish_reason": reason if reason in ("stop", "length") else "stop",
                                  "logprobs": lp}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choices.append(choice)
    usage = {"prompt_tokens": row["prompt_tokens"], "completion_tokens": row["generated_tokens"],
             "total_tokens": row["prompt_tokens"] + row["generated_tokens"]}
    body = {"id": ("chatcmpl-" if chat else "cmpl-") + _short_hash(run_id, custom_id, "body"),
            "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": row.get("model") or "", "choices": choices, "usage": usage}
    return {"id": line_id, "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": f"req_{_short_hash(run_id, custom_id, 'request')}", "body": body},
            "error": None}


def errors_location(output: str) -> str:
    """Where the errors file of a batch output goes: beside it, `.errors` before the suffix."""
    stem, dot, suffix = output.rpartition(".")
    return f"{stem}.errors.{suffix}" if dot else output + ".errors"


class BatchOutputSink:
    """Writes result tables as Batch API output lines; failed requests (and texts that broke their structure)
    also go to the errors file."""

    def __init__(self, handle: IO[bytes], errors: IO[bytes], run_id: str):
        self.handle, self.errors, self.run_id = handle, errors, run_id
        self.created = int(time.time())

    def write(self, table: pa.Table) -> None:
        for record in table.to_pylist():
            line = response_line(record, self.run_id, self.created)
            self.handle.write((json.dumps(line, ensure_ascii=False) + "\n").encode())
            if record.get("error"):
                failed = line if line["error"] else {**line, "response": None,
                                                     "error": {"code": "incomplete_output", "message": record["error"]}}
                self.errors.write((json.dumps(failed, ensure_ascii=False) + "\n").encode())

    def close(self) -> None:
        pass
