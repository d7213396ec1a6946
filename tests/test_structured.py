"""Structured output: SamplingParams' constraints, constrained decoding on the engine and on hf-generate, the
`parsed` column, `score --field`, and the CLI/TOML way in. Every constrained text is checked with jsonschema
(or re.fullmatch, or membership), never trusted."""

import json
import re

import jsonschema
import pyarrow.parquet as pq
import pytest

from shardgen.schemas.errors import InvalidParameter
from shardgen.schemas.sampling import SamplingParams
from shardgen.workers.engine import Engine
from shardgen.workers.engine.constraints import Grammars, check_constraint, choice_grammar
from shardgen.workers.generation import FINISH_LENGTH, GenerationRequest
from shardgen.workers.generators.hf_generate import HFGenerate
from tests.conftest import chat_ids, run_cli, write_jsonl
from tests.test_cli_errors import assert_one_clear_line

# A schema with an enum, a bounded number and a nested object; strings bounded so a random model closes them.
SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["yes", "no", "maybe"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
        "detail": {"type": "object", "properties": {"ok": {"type": "boolean"}, "word": {"type": "string", "maxLength": 4}},
                   "required": ["ok", "word"]},
    },
    "required": ["label", "score", "detail"],
    "additionalProperties": False,
}
QUESTIONS = ["Is the sky blue?", "Is fire cold?", "Do cats bark?", "Is water wet?", "Can fish fly?", "Is 7 prime?",
             "Is Paris in France?", "Is ice hot?", "Do birds sing?", "Is the moon cheese?"]


def requests(tokenizer, count=8):
    return [GenerationRequest(chat_ids(tokenizer, q), seed=i) for i, q in enumerate((QUESTIONS * 3)[:count])]


def assert_valid_json(sample, schema=SCHEMA):
    value = json.loads(sample.text)
    jsonschema.validate(value, schema)
    assert json.loads(sample.parsed) == value
    assert sample.error is None


# ---------------------------------------------------------------- SamplingParams


def test_constraints_are_validated_normalized_and_round_trip():
    params = SamplingParams(json_schema=json.dumps(SCHEMA))
    assert params.constraint == ("json_schema", json.dumps(SCHEMA))
    assert SamplingParams.from_json(params.to_json()) == params
    assert list(json.loads(SamplingParams.from_json(params.to_json()).json_schema)["properties"]) == ["label", "score", "detail"]
    assert SamplingParams.from_mapping({"guided_choice": ["a", "b", "a"]}).choice == ("a", "b")
    assert SamplingParams.from_mapping({"guided_regex": "[0-9]+"}).constraint == ("regex", "[0-9]+")
    assert SamplingParams().constraint is None


@pytest.mark.parametrize("fields, fragment", [
    ({"json_schema": "[1, 2]"}, "json_schema must be a JSON object"),
    ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
    ({"regex": "("}, "regex '(' does not compile"),
    ({"choice": ["a", ""]}, "choice must be a list of non-empty strings"),
    ({"choice": ["a"], "regex": "a"}, "regex and choice cannot be combined"),
    ({"choice": ["a"], "num_beams": 2}, "choice cannot be combined with beam search"),
])
def test_invalid_constraints_are_refused_with_one_line(fields, fragment):
    with pytest.raises(InvalidParameter, match=re.escape(fragment)):
        SamplingParams(**fields)


def test_a_constraint_the_library_cannot_compile_is_refused_before_any_model():
    with pytest.raises(InvalidParameter, match='json_schema cannot be used .*Unsupported type "strang"'):
        check_constraint(SamplingParams(json_schema={"type": "strang"}))
    check_constraint(SamplingParams(choice=("a", 'say "hi"')))


def test_choice_grammar_escapes_its_literals():
    assert choice_grammar(["a", 'b"c']) == 'root ::= "a" | "b\\"c"'


# ---------------------------------------------------------------- the engine and hf-generate


@pytest.mark.parametrize("generator_kind", ["engine", "hf-generate"])
def test_every_constrained_text_validates(tiny_loaded, tiny_reference, generator_kind):
    generator = Engine(tiny_loaded, batch_size=8) if generator_kind == "engine" else HFGenerate(tiny_reference, 8)
    reqs = requests(tiny_loaded.tokenizer)
    for output in generator.generate(reqs, SamplingParams(json_schema=SCHEMA, max_new_tokens=64)):
        assert_valid_json(output.samples[0])
    pattern = r"[A-Z][a-z]{1,3}-[0-9]{2}"
    for output in generator.generate(reqs, SamplingParams(regex=pattern, max_new_tokens=16, temperature=1.0)):
        assert re.fullmatch(pattern, output.samples[0].text) and output.samples[0].error is None
    choices = ("red", "green", "dark blue")
    for output in generator.generate(reqs, SamplingParams(choice=choices, max_new_tokens=8, temperature=1.0, n=2)):
        assert all(s.text in choices and s.finish_reason == "stop" for s in output.samples)


def test_engine_and_hf_generate_give_the_same_constrained_tokens(tiny_loaded, tiny_reference):
    reqs = requests(tiny_loaded.tokenizer, 6)
    params = SamplingParams(json_schema=SCHEMA, max_new_tokens=64)
    engine = Engine(tiny_loaded, batch_size=4).generate(reqs, params)
    reference = HFGenerate(tiny_reference, 3).generate(reqs, params)
    assert [o.samples[0].token_ids for o in engine] == [o.samples[0].token_ids for o in reference]


def test_constrained_sampling_is_batch_invariant(tiny_loaded):
    reqs = requests(tiny_loaded.tokenizer, 8)
    params = SamplingParams(json_schema=SCHEMA, max_new_tokens=64, temperature=0.9, top_p=0.9)
    together = Engine(tiny_loaded, batch_size=8).generate(reqs, params)
    alone = [Engine(tiny_loaded, batch_size=1).generate([r], params)[0] for r in reqs[:3]]
    assert [o.samples[0].token_ids for o in together[:3]] == [o.samples[0].token_ids for o in alone]


@pytest.mark.parametrize("generator_kind", ["engine", "hf-generate"])
def test_text_cut_before_the_structure_closes_is_marked_not_passed_off(tiny_loaded, tiny_reference, generator_kind):
    generator = Engine(tiny_loaded, batch_size=4) if generator_kind == "engine" else HFGenerate(tiny_reference, 4)
    for output in generator.generate(requests(tiny_loaded.tokenizer, 3), SamplingParams(json_schema=SCHEMA, max_new_tokens=4)):
        sample = output.samples[0]
        assert sample.finish_reason == FINISH_LENGTH and sample.parsed is None
        assert "ends before its json schema is complete" in output.row_error and "raise max_new_tokens" in output.row_error
        with pytest.raises(ValueError):
            json.loads(sample.text)


def test_each_distinct_constraint_compiles_once(tiny_loaded, monkeypatch):
    engine = Engine(tiny_loaded, batch_size=8)
    compiled = []
    original = Grammars._compile
    monkeypatch.setattr(Grammars, "_compile", lambda self, kind, value: compiled.append(kind) or original(self, kind, value))
    for _ in range(2):
        engine.generate(requests(tiny_loaded.tokenizer), SamplingParams(json_schema=SCHEMA, max_new_tokens=4))
    assert compiled == ["json_schema"]


def test_a_constraint_the_tokenizer_cannot_serve_fails_its_rows_not_the_call(tiny_loaded):
    engine = Engine(tiny_loaded, batch_size=4)
    outputs = engine.generate(requests(tiny_loaded.tokenizer, 2), SamplingParams(json_schema={"type": "strang"}))
    assert all(o.error and "json_schema cannot be compiled" in o.error for o in outputs)


def test_the_mask_leaves_logprobs_raw(tiny_loaded):
    engine = Engine(tiny_loaded, batch_size=2)
    reqs = requests(tiny_loaded.tokenizer, 2)
    free = engine.generate(reqs, SamplingParams(max_new_tokens=1, logprobs=3))
    forced = engine.generate(reqs, SamplingParams(choice=("zzzz",), max_new_tokens=1, logprobs=3))
    for f, c in zip(free, forced):
        assert c.samples[0].logprobs[0].top_token_ids == f.samples[0].logprobs[0].top_token_ids


# ---------------------------------------------------------------- the command


@pytest.fixture()
def questions(tmp_path):
    return write_jsonl(tmp_path / "q.jsonl", [{"question": q, "answer": "yes" if i % 2 == 0 else "no"}
                                              for i, q in enumerate(QUESTIONS[:6])])


def test_run_with_a_schema_file_writes_a_parsed_column_and_score_reads_a_field(tmp_path, tiny_model_dir, questions):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    output = tmp_path / "out.parquet"
    result = run_cli("run", str(questions), "-o", str(output), "--model", str(tiny_model_dir), "--device", "cpu",
                     "--json-schema", str(schema_file), "--max-new-tokens", "64", "--ground-truth-column", "answer")
    assert result.returncode == 0, result.stderr
    rows = pq.read_table(output).to_pylist()
    assert len(rows) == 6
    for row in rows:
        jsonschema.validate(json.loads(row["parsed"]), SCHEMA)
        assert json.loads(row["generation"]) == json.loads(row["parsed"]) and row["error"] is None
    scored = run_cli("score", str(output), "--field", "label", "--metric", "exact_match", "--json")
    assert scored.returncode == 0, scored.stderr
    labels = [json.loads(r["parsed"])["label"] for r in rows]
    expected = sum(label == row["ground_truth"] for label, row in zip(labels, rows)) / len(rows)
    assert json.loads(scored.stdout)["exact_match"] == pytest.approx(expected)
    free = run_cli("score", str(output), "--metric", "exact_match", "--json")
    assert json.loads(free.stdout)["exact_match"] == 0.0  # the whole JSON text is never the bare label


def test_choice_from_toml_and_regex_from_a_flag(tmp_path, tiny_model_dir, questions):
    config = tmp_path / "run.toml"
    config.write_text('[generation]\nchoice = ["yes", "no"]\nmax_new_tokens = 8\n')
    output = tmp_path / "out.jsonl"
    result = run_cli("run", str(questions), "-o", str(output), "--model", str(tiny_model_dir), "--device", "cpu",
                     "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert {json.loads(line)["generation"] for line in output.read_text().splitlines()} <= {"yes", "no"}
    result = run_cli("run", str(questions), "-o", str(tmp_path / "r.jsonl"), "--model", str(tiny_model_dir),
                     "--device", "cpu", "--regex", "[0-9]{3}", "--max-new-tokens", "8", "--choice", "a,b")
    assert_one_clear_line(result, "regex and choice cannot be combined")


@pytest.mark.parametrize("value, fragment", [("missing.json", "is neither a JSON object nor a file"),
                                             ('{"type": "strang"}', 'Unsupported type "strang"'),
                                             ("{oops", "json_schema is not valid JSON")])
def test_a_bad_schema_flag_is_one_line(tmp_path, questions, value, fragment):
    result = run_cli("run", str(questions), "-o", str(tmp_path / "o.parquet"), "--json-schema", value)
    assert_one_clear_line(result, fragment)


def test_the_python_api_takes_a_schema_and_gives_the_parsed_value(tiny_model_dir):
    from shardgen.workers import LLM

    llm = LLM(model=str(tiny_model_dir), device="cpu", max_new_tokens=64)
    done = llm.chat([[{"role": "user", "content": "Is it?"}]], json_schema=SCHEMA)
    jsonschema.validate(done[0].parsed, SCHEMA)
    assert done[0].parsed == json.loads(done[0].text) and done[0].error is None
    cut = llm.generate(["Is it?"], json_schema=SCHEMA, max_new_tokens=3)[0]
    assert cut.parsed is None and "raise max_new_tokens" in cut.error and cut.finish_reason == "length"
