"""A fine-tuning suite's `Evaluator`: scores the Inferencer's output file against its ground truth.

    predictions = Inferencer().run()        # writes inferencer_output.jsonl
    scores = Evaluator().run()              # {"exact_match": 0.5, "token_f1": 0.62, ...}

The suite scored with ragas (BLEU, ROUGE, LLM-judged metrics, needing an OpenAI key); this one scores with
`shardgen score`'s metrics, computed locally: exact_match, normalized_exact_match, contains, token_f1 and
numeric_match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from shardgen.producer.score import (
    METRICS,
    ScoreSummary,
    check_metrics,
    read_results,
    score_rows,
    write_scored,
)
from shardgen.schemas.errors import InputError, InvalidParameter

from .inferencer import DEFAULT_OUTPUT, SECTION, ConfigManager

EVALUATOR_SECTION = "evaluator"
SUMMARY_FILE = "evaluator_output_summary.json"
DETAILED_FILE = "evaluator_output_detailed.jsonl"


class Evaluator:
    """Reads the file the Inferencer wrote (its [inferencer] output_file, else inferencer_output.jsonl) and
    scores each predicted_answer against its ground_truth. The metrics are the [evaluator] section's
    `metrics`, if the configuration (default: ./config.toml, when there is one) has them, else all of
    shardgen's."""

    def __init__(
        self,
        *,
        config_manager: ConfigManager | None = None,
        input_file: str | Path | None = None,
        metrics: Sequence[str] | None = None,
    ):
        if config_manager is None and Path("config.toml").is_file():
            config_manager = ConfigManager()
        self.config_manager = config_manager
        inferencer, evaluator = (
            config_manager.get_section(name)
            if config_manager is not None and config_manager.has_section(name)
            else {}
            for name in (SECTION, EVALUATOR_SECTION)
        )
        self.input_file = Path(input_file or inferencer.get("output_file") or DEFAULT_OUTPUT)
        chosen = metrics if metrics is not None else evaluator.get("metrics")
        if chosen is not None and (isinstance(chosen, str) or not isinstance(chosen, Sequence)):
            raise InvalidParameter(
                f"metrics must be a list of metric names, got {chosen!r}", f"use some of {', '.join(METRICS)}"
            )
        self.metrics = check_metrics(chosen)
        self.summary: ScoreSummary | None = None
        self.scores: list[dict[str, float | None] | None] = []

    def run(self, run_name: str | None = None) -> dict[str, float | None]:
        """Score every row; write evaluator_output_summary.json and evaluator_output_detailed.jsonl beside the
        input file and return the mean of each metric (`run_name` is accepted; nothing goes to the hub)."""
        if not self.input_file.is_file():
            raise InputError(
                f"the inferencer's output {self.input_file} does not exist",
                "run Inferencer().run() first, or pass input_file",
            )
        rows, table = read_results(str(self.input_file))
        rows = [
            {**row, "error": (row.get("metadata") or {}).get("error")} for row in rows
        ]  # failed rows score 0
        self.scores, self.summary = score_rows(rows, self.metrics, prediction_column=None)
        if rows and not self.summary.scored:
            raise InputError(
                f"none of the {len(rows)} rows of {self.input_file} has a ground truth to score against",
                f"set ground_truth_column in [{SECTION}] and run the Inferencer again",
            )
        folder = self.input_file.parent
        (folder / SUMMARY_FILE).write_text(
            json.dumps(self.summary.to_dict(), indent=2) + "\n", encoding="utf-8"
        )
        write_scored(
            str(folder / DETAILED_FILE), [_without_error(r) for r in rows], self.scores, table, self.metrics
        )
        return dict(self.summary.means)


def _without_error(row: dict[str, Any]) -> dict[str, Any]:
    """A row as the Inferencer wrote it (its error stays in its metadata)."""
    return {key: value for key, value in row.items() if key != "error"}
