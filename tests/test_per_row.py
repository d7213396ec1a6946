"""Per-row requests: a params column over the run's SamplingParams, rows with different settings in one batch,
each row's result what it would be alone, an invalid row failing alone."""

import json
import re

import jsonschema
import pyarrow.parquet as pq
import pytest

from shardgen.schemas.errors import InvalidParameter
from shardgen.schemas.model import ModelSpec
from shardgen.schemas.run import ColumnMapping, RunSpec
from shardgen.schemas.rows import shard_from_table
from shardgen.schemas.sampling import SamplingParams
from shardgen.workers.engine import Engine
from shardgen.workers.generation import GenerationRequest
from shardgen.workers.generators.hf_generate import HFGenerate
from shardgen.workers.shard_processing import process_shard
from tests.conftest import chat_ids, run_cli, write_jsonl

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["n"]}
MIXED = [
    SamplingParams(max_new_tokens=6),
    SamplingParams(max_new_tokens=9, temperature=0.9, top_p=0.8, seed=5),
    SamplingParams(json_schema=SCHEMA, max_new_tokens=24),
    SamplingParams(choice=("left", "right"), temperature=1.0, n=2),
    SamplingParams(max_new_tokens=5, logprobs=2, repetition_penalty=1.3),
    SamplingParams(regex="[a-z]{2}[0-9]", temperature=0.7, top_k=20),
]


def mixed_requests(tokenizer):
    questions = ["One?", "Two?", "Three?", "Four?", "Five?", "Six?"]
    return [GenerationRequest(chat_ids(tokenizer, q), seed=i, params=p) for i, (q, p) in enumerate(zip(questions, MIXED))]


def samples(outputs):
    """Tokens and finish reasons exactly; logprobs to 3 decimals (a batch's matmuls round differently)."""
    def rounded(logprobs):
        return None if logprobs is None else [(t.token_id, round(t.logprob, 3), t.top_token_ids) for t in logprobs]
    return [[(s.token_ids, s.finish_reason, rounded(s.logprobs)) for s in o.samples] for o in outputs]


def test_override_keeps_the_run_defaults_and_replaces_a_constraint():
    run = SamplingParams(temperature=0.5, json_schema=SCHEMA, max_new_tokens=30)
    row = run.override({"max_tokens": 8, "guided_regex": "[0-9]+"})
    assert (row.temperature, row.max_new_tokens, row.constraint) == (0.5, 8, ("regex", "[0-9]+"))
    with pytest.raises(InvalidParameter, match="unknown generation parameter 'temprature' in a row"):
        run.override({"temprature": 1}, source="a row")


@pytest.mark.parametrize("generator_kind", ["engine", "hf-generate"])
def test_rows_with_different_parameters_share_a_call_and_match_their_runs_alone(tiny_loaded, tiny_reference, generator_kind):
    def make():
        return Engine(tiny_loaded, batch_size=8) if generator_kind == "engine" else HFGenerate(tiny_reference, 8)

    reqs = mixed_requests(tiny_loaded.tokenizer)
    together = make().generate(reqs, SamplingParams())
    alone = [make().generate([GenerationRequest(r.prompt_ids, r.seed)], r.params)[0] for r in reqs]
    assert samples(together) == samples(alone)
    assert [len(o.samples) for o in together] == [1, 1, 1, 2, 1, 1]
    assert max(len(s.token_ids) for s in together[0].samples) <= 6
    jsonschema.validate(json.loads(together[2].samples[0].text), SCHEMA)
    assert {s.text for s in together[3].samples} <= {"left", "right"}
    assert len(together[4].samples[0].logprobs) == len(together[4].samples[0].token_ids)
    assert re.fullmatch("[a-z]{2}[0-9]", together[5].samples[0].text)


def test_a_mixed_batch_is_batch_invariant_at_any_batch_size(tiny_loaded):
    reqs = mixed_requests(tiny_loaded.tokenizer)
    wide = Engine(tiny_loaded, batch_size=8).generate(reqs, SamplingParams())
    narrow = Engine(tiny_loaded, batch_size=2, step_tokens=7).generate(reqs, SamplingParams())
    assert samples(wide) == samples(narrow)


@pytest.fixture()
def spec_for(tiny_model_dir):
    def make(**params):
        return RunSpec(input="x", model=ModelSpec(model=str(tiny_model_dir)), params=SamplingParams(**params),
                       columns=ColumnMapping(prompt_column="question", params_column="params"), shard_size=8, base_seed=7)
    return make


def shard_of(spec, records):
    import pyarrow as pa

    return shard_from_table(spec, 0, pa.Table.from_pylist(records))


def test_an_invalid_row_fails_alone_with_one_line(tmp_path, tiny_loaded, spec_for):
    spec = spec_for(max_new_tokens=4)
    records = [{"question": "Hi?", "params": json.dumps({"temperature": -1})},
               {"question": "Hi?", "params": '{"json_schema": [1]}'},
               {"question": "Hi?", "params": "not json"},
               {"question": "Hi?", "params": json.dumps({"n": 3})},
               {"question": "Hi?", "params": json.dumps({"json_schema": {"type": "strang"}})},
               {"question": "Hi?", "params": None}]
    location = str(tmp_path / "part.parquet")
    outcome = process_shard(shard_of(spec, records), spec, tiny_loaded, Engine(tiny_loaded, batch_size=4), location)
    rows = pq.read_table(location).to_pylist()
    errors = [r["error"] for r in rows]
    assert errors[0] == "params column 'params': temperature must be >= 0, got -1"
    assert errors[1].startswith("params column 'params': json_schema must be a JSON object")
    assert errors[2] == "params column 'params' holds text that is not a JSON object in this row"
    assert "n=3 needs a run with --n above 1" in errors[3]
    assert 'json_schema cannot be compiled for constrained decoding (Unsupported type "strang")' in errors[4]
    assert errors[5] is None and rows[5]["generation"]
    assert all("\n" not in e for e in errors[:5]) and outcome.rows_failed == 5


def test_a_row_with_the_runs_own_parameters_is_the_row_without_any(tmp_path, tiny_loaded, spec_for):
    spec = spec_for(max_new_tokens=6, temperature=0.8)
    records = [{"question": "Hi?", "params": json.dumps({"temperature": 0.8})}, {"question": "Hi?", "params": None}]
    location = str(tmp_path / "part.parquet")
    process_shard(shard_of(spec, records), spec, tiny_loaded, Engine(tiny_loaded, batch_size=4), location)
    first, second = pq.read_table(location).to_pylist()
    # Same parameters; seeds differ only because the rows do (each row's seed derives from its index).
    assert first["error"] is None and second["error"] is None
    same_seed = [{"question": "Hi?", "params": json.dumps({"seed": 11})}] * 2
    process_shard(shard_of(spec, same_seed), spec, tiny_loaded, Engine(tiny_loaded, batch_size=4), location)
    a, b = pq.read_table(location).to_pylist()
    assert a["generation"] == b["generation"]  # a row's own seed repeats its text, wherever the row sits


def test_params_column_through_the_command(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "rows.jsonl", [
        {"question": "Is it?", "params": {"choice": ["yes", "no"]}},
        {"question": "Code?", "params": {"regex": "[A-Z]{3}", "max_tokens": 5}},
        {"question": "Bad?", "params": {"temperature": -2}},
        {"question": "Plain?"},
    ])
    output = tmp_path / "out.jsonl"
    result = run_cli("run", str(data), "-o", str(output), "--model", str(tiny_model_dir), "--device", "cpu",
                     "--params-column", "params", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert rows[0]["generation"] in ("yes", "no") and re.fullmatch("[A-Z]{3}", rows[1]["generation"])
    assert rows[2]["error"] == "params column 'params': temperature must be >= 0, got -2"
    assert rows[3]["error"] is None and rows[3]["generated_tokens"] <= 6
    assert "1 row(s) failed" in result.stderr
