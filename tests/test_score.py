"""Scoring answers against ground truth: the metric functions, per-row scores and summaries, `shardgen score`."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from shardgen.producer.score import (
    METRICS,
    contains,
    exact_match,
    last_number,
    normalize_answer,
    normalized_exact_match,
    numeric_match,
    reference_number,
    score,
    score_answer,
    score_rows,
    score_table,
    token_f1,
)
from shardgen.schemas.errors import InputError, InvalidParameter
from tests.conftest import run_cli, write_jsonl


def test_normalization_and_text_metrics():
    assert normalize_answer("  The Eiffel-Tower, in PARIS!  ") == "eiffeltower in paris"
    assert exact_match(" Paris ", "Paris") == 1.0 and exact_match("paris", "Paris") == 0.0
    assert normalized_exact_match("The Pacific Ocean.", "pacific ocean") == 1.0
    assert contains("The capital of France is Paris.", "paris") == 1.0
    assert contains("I have 14 apples", "4") == 0.0  # whole words, not substrings
    assert contains("carbon dioxide and water", "Carbon Dioxide") == 1.0
    assert token_f1("the cat sat on the mat", "cat on mat") == pytest.approx(6 / 7)  # articles do not count
    assert token_f1("Paris is the capital", "Paris") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert token_f1("", "") == 1.0 and token_f1("something", "") == 0.0


@pytest.mark.parametrize(
    "text, number",
    [
        ("So she earns 1,234 dollars.", 1234.0),
        ("The temperature fell to -3.5 degrees", -3.5),
        ("It costs $12 in all", 12.0),
        ("About 3/4 of them", 0.75),
        ("Between 3-4 people, so 4", 4.0),
        ("Lists 1,2,3", 3.0),
        ("Answer: 42.", 42.0),
        ("no number here", None),
    ],
)
def test_last_number(text, number):
    assert last_number(text) == number


def test_numeric_match_reads_gsm8k_and_boxed_references():
    gsm8k = "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### 72"
    assert reference_number(gsm8k) == 72.0
    assert numeric_match("She sold 48 in April and 24 in May, 72 in total.", gsm8k) == 1.0
    assert numeric_match("She sold 72 clips, then 24 more.", gsm8k) == 0.0  # the last number counts
    assert reference_number(r"so the answer is \boxed{1,440} degrees after 3 steps") == 1440.0
    assert numeric_match("[1440.0000]", "[1440]") == 1.0 and numeric_match("The total is $1,000", "1000") == 1.0
    assert numeric_match("I don't know", "7") == 0.0
    assert numeric_match("72", "Paris") is None  # no number to match: the metric does not apply


def test_rows_take_the_best_reference_the_mean_over_samples_and_count_failures():
    assert score_answer("paris", ["Lyon", "Paris"])["normalized_exact_match"] == 1.0
    assert score_answer(["4", "five"], "4", ["exact_match"]) == {"exact_match": 0.5}
    assert score_answer("anything", None) is None
    rows = [
        {"generation": "Paris", "ground_truth": "Paris", "error": None},
        {"generation": "", "ground_truth": "Nile", "error": "prompt too long"},
        {"generation": "whatever", "ground_truth": None, "error": None},
        {"generation": "It is 8.", "ground_truth": 8, "error": None},
    ]
    scores, summary = score_rows(rows, ["exact_match", "numeric_match"])
    assert scores[2] is None and scores[1] == {"exact_match": 0.0, "numeric_match": None}
    assert (summary.rows, summary.scored, summary.failed) == (4, 3, 1)
    assert scores[0]["numeric_match"] is None and summary.counts == {"exact_match": 3, "numeric_match": 1}
    assert summary.means == {"exact_match": pytest.approx(1 / 3), "numeric_match": 1.0}
    with pytest.raises(InvalidParameter, match="unknown metric bleu"):
        score_rows(rows, ["bleu"])
    with pytest.raises(InputError, match="no 'ground_truth' column"):
        score_rows([{"generation": "x"}])


def test_score_table_adds_a_struct_column_and_keeps_the_run_metadata():
    table = pa.table({"generation": ["Paris", "Rome"], "ground_truth": ["Paris", "Madrid"]})
    table = table.replace_schema_metadata({b"shardgen.run_id": b"r1"})
    scored, summary = score_table(table)
    assert scored.column("score").to_pylist()[0] == dict.fromkeys(METRICS, 1.0) | {"numeric_match": None}
    assert scored.schema.metadata[b"shardgen.run_id"] == b"r1"
    assert summary.means["exact_match"] == 0.5


def test_score_command_on_inferencer_rows_and_parquet(tmp_path):
    rows = [
        {"question": "Capital of France?", "predicted_answer": "It is Paris.", "ground_truth": "Paris", "metadata": {"model_id": "m"}},
        {"question": "2+2?", "predicted_answer": "4", "ground_truth": "4", "metadata": {"model_id": "m"}},
    ]
    source = write_jsonl(tmp_path / "inferencer_output.jsonl", rows)
    result = CliRunner().invoke(score, [str(source), "--json", "-o", str(tmp_path / "scored.jsonl")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1]) == {
        "exact_match": 0.5, "normalized_exact_match": 0.5, "contains": 1.0, "token_f1": pytest.approx(0.75), "numeric_match": 1.0,
    }
    written = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert written[0]["metadata"] == {"model_id": "m"} and written[0]["score"]["contains"] == 1.0

    result = CliRunner().invoke(score, [str(source), "--metric", "contains", "-o", str(tmp_path / "scored.parquet")])
    assert result.exit_code == 0, result.output
    assert "contains" in result.output and "1.000" in result.output
    assert pq.read_table(tmp_path / "scored.parquet").column("score").to_pylist() == [{"contains": 1.0}] * 2


def test_score_errors_are_one_line(tmp_path):
    missing = run_cli("score", str(tmp_path / "nope.jsonl"))
    assert missing.returncode == 2 and "error: results file" in missing.stderr and "Traceback" not in missing.stderr
    no_truth = write_jsonl(tmp_path / "r.jsonl", [{"generation": "x"}])
    result = run_cli("score", str(no_truth))
    assert result.returncode == 2 and "no 'ground_truth' column" in result.stderr and "Traceback" not in result.stderr


def test_run_then_score_gives_each_row_its_score(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", [
        {"id": "a", "question": "What is 2+2?", "answer": "4"},
        {"id": "b", "question": "Capital of Italy?", "answer": ["Rome", "Roma"]},
        {"id": "c", "question": "Say nothing.", "answer": None},
    ])
    out = tmp_path / "results.jsonl"
    run = run_cli("run", str(data), "-o", str(out), "--model", str(tiny_model_dir), "--device", "cpu",
                  "--ground-truth-column", "answer", "--max-new-tokens", "4")
    assert run.returncode == 0, run.stderr
    scored = run_cli("score", str(out), "--json", "-o", str(tmp_path / "scored.parquet"))
    assert scored.returncode == 0, scored.stderr
    table = pq.read_table(tmp_path / "scored.parquet")
    results = [json.loads(line) for line in out.read_text().splitlines()]
    expected = [score_answer(r["generation"], r["ground_truth"]) for r in results]
    assert table.column("score").to_pylist() == expected and expected[2] is None
    means = json.loads(scored.stdout)
    assert means["numeric_match"] == expected[0]["numeric_match"]  # the only reference with a number
    assert means == {m: pytest.approx((expected[0][m] + expected[1][m]) / 2) for m in METRICS if m != "numeric_match"} | {
        "numeric_match": expected[0]["numeric_match"]}
