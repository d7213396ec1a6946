"""Structured output with the real default model on the bundled questions: 24 rows, a schema with an enum, a
number and a nested object (producer/examples/answer_schema.json); every output parses and validates, on
shardgen's engine (through `shardgen run`) and on hf-generate."""

import json
from pathlib import Path

import jsonschema
import pytest

from shardgen.schemas.sampling import SamplingParams
from shardgen.schemas.shard import InputRow
from shardgen.workers.generation import GenerationRequest
from shardgen.workers.generators.hf_generate import HFGenerate
from shardgen.workers.prompts import tokenize_row
from tests.conftest import run_cli

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(1800)]
SLOW_MACHINE_S = 1500
"""24 rows of about 50 tokens: under a minute on a quiet 2-core machine, many times that on a shared one."""

EXAMPLES = Path(__file__).resolve().parent.parent / "producer" / "examples"
SCHEMA = json.loads((EXAMPLES / "answer_schema.json").read_text())
QUESTIONS = [json.loads(line) for line in (EXAMPLES / "questions.jsonl").read_text().splitlines()]
MAX_NEW_TOKENS = "128"


def test_every_answer_of_the_bundled_example_validates_on_the_engine(tmp_path):
    assert len(QUESTIONS) == 24
    output = tmp_path / "answers.parquet"
    result = run_cli("run", str(EXAMPLES / "questions.jsonl"), "-o", str(output), "--prompt-column", "question",
                     "--system-prompt", "Answer as JSON.", "--ground-truth-column", "answer",
                     "--json-schema", str(EXAMPLES / "answer_schema.json"), "--max-new-tokens", MAX_NEW_TOKENS,
                     "--batch-size", "24", "--seed", "1", timeout=SLOW_MACHINE_S)
    assert result.returncode == 0, result.stderr
    import pyarrow.parquet as pq

    rows = pq.read_table(output).to_pylist()
    assert len(rows) == 24
    for row in rows:
        assert row["error"] is None and row["finish_reason"] == "stop", row
        value = json.loads(row["generation"])
        jsonschema.validate(value, SCHEMA)
        assert json.loads(row["parsed"]) == value
    scored = run_cli("score", str(output), "--field", "answer", "--metric", "contains", "--json")
    assert scored.returncode == 0 and json.loads(scored.stdout)["contains"] > 0  # e.g. "Paris" for France


def test_every_answer_validates_on_hf_generate(real_loaded):
    tokenizer = real_loaded.tokenizer
    requests = [GenerationRequest(tokenize_row(tokenizer, InputRow(i, str(i), prompt=q["question"]),
                                               system_prompt="Answer as JSON.").ids, seed=i)
                for i, q in enumerate(QUESTIONS)]
    params = SamplingParams(json_schema=SCHEMA, max_new_tokens=int(MAX_NEW_TOKENS))
    outputs = HFGenerate(real_loaded, batch_size=12).generate(requests, params)
    for output in outputs:
        sample = output.samples[0]
        assert output.row_error is None and sample.finish_reason == "stop", sample.text
        jsonschema.validate(json.loads(sample.text), SCHEMA)
