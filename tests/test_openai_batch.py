"""OpenAI Batch API files in and out, embedded and distributed. Every output body is validated by the `openai`
package's own response models, every error by its BatchError, the envelope by the Batch API's documented shape,
and every constrained answer by jsonschema."""

import json

import jsonschema
import openai.types
import openai.types.chat
import pytest

from shardgen.producer.openai_batch import body_params, errors_location, read_batch_file
from shardgen.schemas.errors import InvalidParameter
from shardgen.schemas.model import ModelSpec
from shardgen.schemas.run import RunSpec
from tests.conftest import run_cli, wait_until, run_status_now

SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "size": {"type": "integer", "minimum": 1,
          "maximum": 9}, "tag": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}},
          "required": ["color", "size", "tag"], "additionalProperties": False}

ENVELOPE = {  # the Batch API's output line, as OpenAI documents it
    "type": "object",
    "required": ["id", "custom_id", "response", "error"],
    "properties": {
        "id": {"type": "string", "pattern": "^batch_req_"},
        "custom_id": {"type": "string"},
        "response": {"oneOf": [{"type": "null"}, {"type": "object", "required": ["status_code", "request_id", "body"],
                               "properties": {"status_code": {"const": 200}, "request_id": {"type": "string"},
                                              "body": {"type": "object"}}}]},
        "error": {"oneOf": [{"type": "null"}, {"type": "object", "required": ["code", "message"]}]},
    },
    "additionalProperties": False,
}


def request(custom_id, model, url="/v1/chat/completions", **body):
    if url == "/v1/chat/completions":
        body.setdefault("messages", [{"role": "user", "content": f"Question {custom_id}?"}])
    else:
        body.setdefault("prompt", f"Once upon a time {custom_id}")
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": {"model": model, **body}}


def write_requests(path, requests):
    path.write_text("".join(json.dumps(r) + "\n" for r in requests))
    return path


def chat_requests(model):
    return [
        request("plain", model, max_tokens=6),
        request("schema", model, max_tokens=40, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}),
        request("samples", model, max_tokens=5, n=2, temperature=0.9, seed=3, logprobs=True, top_logprobs=2),
        request("stop", model, max_completion_tokens=8, stop=["\n"], top_p=0.9, temperature=0.5),
        request("parts", model, max_tokens=4, messages=[{"role": "system", "content": "Be brief."},
                                                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]),
        request("other-model", "gpt-4o-mini", max_tokens=4),
        request("tools", model, max_tokens=4, tools=[{"type": "function", "function": {"name": "f"}}]),
        request("bad-value", model, temperature=-1),
        request("cut", model, max_tokens=3, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}),
    ]


REFUSED = {"other-model": "is not this run's model", "tools": "body field 'tools' is not supported",
           "bad-value": "temperature must be >= 0, got -1"}
FAILED = [*REFUSED, "cut"]
"""In the errors file: the refused requests, and the one whose JSON was cut by max_tokens (its output line keeps
the text with finish_reason length, as OpenAI answers; the errors file says it is not whole)."""


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_output(lines, requests, chat=True):
    """Every line: the envelope, the openai package's model of its body or error; constrained ones by jsonschema."""
    assert [line["custom_id"] for line in lines] == [r["custom_id"] for r in requests]
    by_id = {}
    for line in lines:
        jsonschema.validate(line, ENVELOPE)
        if line["response"] is not None:
            body = line["response"]["body"]
            model = openai.types.chat.ChatCompletion if chat else openai.types.Completion
            parsed = model.model_validate(body, strict=True)
            assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] > 0
        else:
            parsed = openai.types.BatchError.model_validate(line["error"], strict=True)
        by_id[line["custom_id"]] = parsed
    return by_id


def test_body_fields_become_the_rows_parameters():
    body = {"model": "m", "messages": [], "max_tokens": 9, "temperature": 0.3, "top_p": 0.5, "n": 2, "seed": 1,
            "stop": "x", "logprobs": True, "top_logprobs": 3, "stream": False, "presence_penalty": 0, "user": "u",
            "response_format": {"type": "json_object"}}
    assert body_params(body, "/v1/chat/completions") == {
        "max_new_tokens": 9, "temperature": 0.3, "top_p": 0.5, "n": 2, "seed": 1, "stop": "x", "logprobs": 3,
        "json_schema": {"type": "object"}}
    assert body_params({"logprobs": 2, "prompt": "p"}, "/v1/completions") == {"logprobs": 2}
    for bad, fragment in [({"presence_penalty": 0.5}, "'presence_penalty' is not supported"),
                          ({"response_format": {"type": "xml"}}, "is not supported"),
                          ({"top_logprobs": 2}, "top_logprobs needs logprobs: true")]:
        with pytest.raises(InvalidParameter, match=fragment):
            body_params(bad, "/v1/chat/completions")


def test_malformed_lines_fail_alone():
    spec = RunSpec(input="batch.jsonl", model=ModelSpec(model="smollm2-135m"))
    lines = [json.dumps(request("a", "smollm2-135m")), "{not json", json.dumps(request("a", "smollm2-135m")),
             json.dumps(request("c", "SmolLM2-135M-Instruct", url="/v1/completions")),
             json.dumps({**request("d", "smollm2-135m"), "method": "GET"}), json.dumps(request("e", "HuggingFaceTB/SmolLM2-135M-Instruct"))]
    spec, table = read_batch_file(lines, spec)
    errors = dict(zip(table.column("custom_id").to_pylist(), table.column("request_error").to_pylist()))
    assert errors["a"] is None and errors["e"] is None
    assert errors["line-2"].startswith("line 2 is not JSON")
    assert "custom_id 'a' is used by an earlier request" in errors["line-3"]
    assert "differs from this file's /v1/chat/completions" in errors["c"]
    assert errors["d"] == "method must be POST, got 'GET'"
    assert spec.input_format == "openai-batch" and spec.columns.messages_column == "messages"


def test_chat_batch_file_end_to_end(tmp_path, tiny_model_dir):
    model = tiny_model_dir.name
    requests = chat_requests(model)
    data = write_requests(tmp_path / "batch.jsonl", requests)
    output = tmp_path / "out.jsonl"
    result = run_cli("run", str(data), "-o", str(output), "--model", str(tiny_model_dir), "--device", "cpu", "--seed", "5")
    assert result.returncode == 0, result.stderr
    lines = read_lines(output)
    parsed = check_output(lines, requests)
    for custom_id, fragment in REFUSED.items():
        assert fragment in parsed[custom_id].message, (custom_id, parsed[custom_id].message)
    assert parsed["cut"].choices[0].finish_reason == "length"
    schema_answer = parsed["schema"].choices[0]
    jsonschema.validate(json.loads(schema_answer.message.content), SCHEMA)
    samples = parsed["samples"]
    assert len(samples.choices) == 2
    for choice in samples.choices:
        assert 1 <= len(choice.logprobs.content) <= 5 and all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    assert "\n" not in parsed["stop"].choices[0].message.content
    assert parsed["plain"].choices[0].finish_reason in ("stop", "length") and parsed["plain"].usage.completion_tokens <= 6
    errors = read_lines(tmp_path / "out.errors.jsonl")
    assert errors_location(str(output)) == str(tmp_path / "out.errors.jsonl")
    assert sorted(e["custom_id"] for e in errors) == sorted(FAILED)
    for line in errors:
        jsonschema.validate(line, ENVELOPE)
        openai.types.BatchError.model_validate(line["error"], strict=True)
    cut = next(e for e in errors if e["custom_id"] == "cut")["error"]
    assert cut["code"] == "incomplete_output" and "raise max_new_tokens" in cut["message"]
    # The same file again with the same seed: the same answers, so a batch can be rerun and compared.
    again = tmp_path / "again.jsonl"
    assert run_cli("run", str(data), "-o", str(again), "--model", str(tiny_model_dir), "--device", "cpu",
                   "--seed", "5").returncode == 0
    assert [l["response"] and l["response"]["body"]["choices"] for l in read_lines(again)] == \
        [l["response"] and l["response"]["body"]["choices"] for l in lines]


def test_completions_batch_file_with_hf_generate(tmp_path, tiny_model_dir):
    model = tiny_model_dir.name
    requests = [request("one", model, url="/v1/completions", max_tokens=5, logprobs=2),
                request("two", model, url="/v1/completions", max_tokens=4, prompt=["A single prompt"]),
                request("three", model, url="/v1/completions", max_tokens=48, response_format={"type": "json_schema",
                        "json_schema": {"name": "s", "schema": SCHEMA}}),
                request("chat-in-completions", model, max_tokens=4)]
    data = write_requests(tmp_path / "batch.jsonl", requests)
    output = tmp_path / "out.jsonl"
    result = run_cli("run", str(data), "-o", str(output), "--model", str(tiny_model_dir), "--device", "cpu",
                     "--engine", "hf-generate", "--input-format", "openai-batch", "--max-new-tokens", "40")
    assert result.returncode == 0, result.stderr
    parsed = check_output(read_lines(output), requests, chat=False)
    logprobs = parsed["one"].choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) >= 1
    jsonschema.validate(json.loads(parsed["three"].choices[0].text), SCHEMA)
    assert "differs from this file's /v1/completions" in parsed["chat-in-completions"].message


def test_batch_output_needs_a_batch_input_and_jsonl(tmp_path, tiny_model_dir):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"question": "hi"}) + "\n")
    result = run_cli("run", str(rows), "-o", str(tmp_path / "o.jsonl"), "--output-format", "openai-batch",
                     "--model", str(tiny_model_dir), "--device", "cpu")
    assert result.returncode != 0 and "was not made from an OpenAI batch file" in result.stderr
    assert "Traceback" not in result.stderr
    data = write_requests(tmp_path / "batch.jsonl", [request("a", tiny_model_dir.name)])
    result = run_cli("run", str(data), "-o", str(tmp_path / "o.parquet"), "--model", str(tiny_model_dir))
    assert result.returncode != 0 and "the OpenAI batch output format is JSONL" in result.stderr


def test_batch_file_through_submit_workers_and_collect(tmp_path, redis_url, tiny_model_dir, start_worker):
    model = str(tiny_model_dir)
    requests = chat_requests(tiny_model_dir.name) * 1
    data = write_requests(tmp_path / "batch.jsonl", requests)
    worker = start_worker(model, redis_url)
    worker.wait_ready()
    submitted = run_cli("submit", str(data), "--work-dir", str(tmp_path / "work"), "--broker", redis_url,
                        "--model", model, "--shard-size", "4", "--seed", "5", "--json")
    assert submitted.returncode == 0, submitted.stderr
    run_id = json.loads(submitted.stdout)["run_id"]
    wait_until(lambda: run_status_now(run_id, redis_url)["finished_at"] is not None, timeout=300, what="the run to end")
    output = tmp_path / "collected.jsonl"
    collected = run_cli("collect", run_id, "-o", str(output), "--broker", redis_url)
    assert collected.returncode == 0, collected.stderr
    assert f"{len(FAILED)} request(s) failed" in collected.stderr, collected.stderr
    distributed = read_lines(output)
    check_output(distributed, requests)
    embedded = tmp_path / "embedded.jsonl"
    assert run_cli("run", str(data), "-o", str(embedded), "--model", model, "--device", "cpu", "--seed", "5").returncode == 0
    texts = lambda lines: [l["response"] and [c["message"]["content"] for c in l["response"]["body"]["choices"]] for l in lines]  # noqa: E731
    assert texts(distributed) == texts(read_lines(embedded))
    assert len(read_lines(tmp_path / "collected.errors.jsonl")) == len(FAILED)
