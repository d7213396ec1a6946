"""`shardgen score`: compare each generation with its ground truth, per row and as a mean per metric.

Metrics (each 0 or 1 per row, except token_f1 in [0, 1]):

    exact_match             the answer, stripped, is the reference
    normalized_exact_match  equal after SQuAD's normalization (lowercase, no punctuation, no articles a/an/the)
    contains                the normalized reference appears in the normalized answer, as whole words
    token_f1                SQuAD's token F1 between the normalized answer and reference
    numeric_match           the last number in the answer equals the reference's (its `#### N` line for GSM8K,
                            `\\boxed{N}`, or else its last number); `1,234`, `-3.5`, `$12`, `3/4` are numbers.
                            Rows whose reference holds no number are not scored by it.

A reference may be a list of acceptable answers: a row scores its best match. With n > 1 samples per prompt a
row scores the mean over its samples. A row that failed (its `error` is set) scores 0; a row without ground truth
is not scored. The pure functions here are what `collect --score` and the Python API call too.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import click

from shardgen.schemas.errors import InputError, InvalidParameter

from .command_support import one_line_errors

# ---------------------------------------------------------------- answers and numbers

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_NUMBER = re.compile(
    r"(?:(?<![\w.])-)?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?![\d.]))?"
)
_GSM8K_ANSWER = re.compile(r"####\s*(.+)")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def normalize_answer(text: str) -> str:
    """SQuAD's normalization: lowercase, punctuation removed, articles removed, whitespace collapsed."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def normalized_exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def contains(prediction: str, reference: str) -> float:
    """Whether the reference's normalized words appear, in order and together, in the prediction's."""
    words, wanted = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not wanted:
        return 0.0
    return float(any(words[i : i + len(wanted)] == wanted for i in range(len(words) - len(wanted) + 1)))


def token_f1(prediction: str, reference: str) -> float:
    predicted, wanted = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not wanted:
        return float(predicted == wanted)
    common = sum((Counter(predicted) & Counter(wanted)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def parse_number(text: str) -> float | None:
    """`1,234` -> 1234, `-3.5`, `$12` -> 12, `3/4` -> 0.75; None if it is not one number."""
    cleaned = text.replace("$", "").replace(",", "").replace(" ", "")
    try:
        if "/" in cleaned:
            numerator, denominator = cleaned.split("/")
            return float(numerator) / float(denominator)
        return float(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def last_number(text: str) -> float | None:
    """The last number written in a text, or None."""
    for match in reversed(_NUMBER.findall(text)):
        value = parse_number(match)
        if value is not None:
            return value
    return None


def reference_number(reference: str) -> float | None:
    """The number a reference answer gives: after GSM8K's `####`, inside `\\boxed{}`, or its last number."""
    marked = _GSM8K_ANSWER.findall(reference) or _BOXED.findall(reference)
    return last_number(marked[-1] if marked else reference)


def numeric_match(prediction: str, reference: str) -> float | None:
    """1 or 0; None when the reference holds no number (the metric does not apply to that row)."""
    wanted, given = reference_number(reference), last_number(prediction)
    if wanted is None:
        return None
    if given is None:
        return 0.0
    return float(abs(given - wanted) <= 1e-6 * max(1.0, abs(wanted)))


SCORERS: dict[str, Callable[[str, str], float | None]] = {
    "exact_match": exact_match,
    "normalized_exact_match": normalized_exact_match,
    "contains": contains,
    "token_f1": token_f1,
    "numeric_match": numeric_match,
}
METRICS = tuple(SCORERS)


def check_metrics(metrics: Iterable[str] | None) -> tuple[str, ...]:
    chosen = tuple(metrics or METRICS)
    unknown = [m for m in chosen if m not in SCORERS]
    if unknown or not chosen:
        raise InvalidParameter(f"unknown metric {', '.join(unknown)}", f"use one or more of {', '.join(METRICS)}")
    return chosen


def references_of(ground_truth: Any) -> list[str]:
    """The acceptable answers a ground-truth value holds: a string, a number, or a list of them."""
    if ground_truth is None:
        return []
    if isinstance(ground_truth, (list, tuple)):
        return [str(g) for g in ground_truth if g is not None]
    return [str(ground_truth)]


def score_answer(
    prediction: str | Sequence[str] | None, ground_truth: Any, metrics: Sequence[str] = METRICS
) -> dict[str, float | None] | None:
    """Each metric for one row: best over the references, mean over the samples (a missing answer scores 0).

    None without ground truth; a metric is None where it applies to no reference (numeric_match, no number)."""
    references = references_of(ground_truth)
    if not references:
        return None
    samples = [prediction] if prediction is None or isinstance(prediction, str) else list(prediction) or [None]
    scores: dict[str, float | None] = {}
    for metric in metrics:
        scorer = SCORERS[metric]
        applicable = [r for r in references if scorer("", r) is not None]
        if not applicable:
            scores[metric] = None
            continue
        per_sample = [max(scorer(p, r) or 0.0 for r in applicable) if p is not None else 0.0 for p in samples]
        scores[metric] = sum(per_sample) / len(per_sample)
    return scores


# ---------------------------------------------------------------- rows and tables

@dataclass
class ScoreSummary:
    means: dict[str, float | None] = field(default_factory=dict)
    """Mean of each metric over the rows it scored (None if it scored none)."""
    counts: dict[str, int] = field(default_factory=dict)
    """Rows each metric scored."""
    rows: int = 0
    scored: int = 0
    """Rows with a ground truth."""
    failed: int = 0
    """Scored rows whose generation failed (they count as wrong)."""

    def to_dict(self) -> dict[str, Any]:
        return {"means": dict(self.means), "counts": dict(self.counts), "rows": self.rows, "scored": self.scored,
                "failed": self.failed}

    def add(self, other: "ScoreSummary") -> None:
        """Fold in the summary of more rows (collect scores one shard at a time)."""
        for metric, count in other.counts.items():
            mine, theirs = self.counts.get(metric, 0), count
            if mine + theirs:
                total = (self.means.get(metric) or 0.0) * mine + (other.means.get(metric) or 0.0) * theirs
                self.means[metric] = total / (mine + theirs)
            else:
                self.means.setdefault(metric, None)
            self.counts[metric] = mine + theirs
        self.rows += other.rows
        self.scored += other.scored
        self.failed += other.failed


def prediction_column_of(columns: Sequence[str], wanted: str | None = None) -> str:
    """The column of generated answers: `wanted`, else shardgen's `generation`, else the Inferencer's."""
    candidates = [wanted] if wanted else ["generation", "predicted_answer"]
    for name in candidates:
        if name in columns:
            return name
    raise InputError(
        f"the results have no {' or '.join(repr(c) for c in candidates)} column",
        f"name the column of answers with --prediction-column (columns: {', '.join(columns)})",
    )


def parsed_field(parsed: Any, path: str) -> str | list[str] | None:
    """The value at a dotted `path` (e.g. `details.topic`) of a `parsed` cell (JSON text, or a list of them when
    n > 1), as text to score; None where the value is missing."""
    if isinstance(parsed, list):
        return [_field_text(p, path) for p in parsed]  # type: ignore[misc]
    return _field_text(parsed, path)


def _field_text(parsed: Any, path: str) -> Any:
    if parsed is None:
        return None
    value = json.loads(parsed) if isinstance(parsed, str) else parsed
    for key in path.split("."):
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return None
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def score_rows(
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] | None = None,
    prediction_column: str | None = None,
    ground_truth_column: str = "ground_truth",
    field: str | None = None,
) -> tuple[list[dict[str, float | None] | None], ScoreSummary]:
    """Per-row scores (None where a row has no ground truth) and their summary. With `field`, the prediction is
    that field of the row's `parsed` value (a run under --json-schema), not its text."""
    metrics = check_metrics(metrics)
    columns = list(rows[0]) if rows else []
    if rows and ground_truth_column not in columns:
        raise InputError(
            f"the results have no {ground_truth_column!r} column to score against",
            "run with --ground-truth-column so the answers are carried through, or pass --ground-truth-column here",
        )
    if field is not None and rows and "parsed" not in columns:
        raise InputError("the results have no `parsed` column to take --field from",
                         "score a run made with --json-schema, or drop --field")
    predictions = prediction_column_of(columns, prediction_column) if rows else prediction_column or "generation"
    scores: list[dict[str, float | None] | None] = []
    totals = dict.fromkeys(metrics, 0.0)
    summary = ScoreSummary(rows=len(rows), counts=dict.fromkeys(metrics, 0))
    for row in rows:
        failed = bool(row.get("error"))
        prediction = parsed_field(row.get("parsed"), field) if field is not None else row.get(predictions)
        score = score_answer(None if failed else prediction, row.get(ground_truth_column), metrics)
        scores.append(score)
        if score is not None:
            summary.scored += 1
            summary.failed += failed
            for metric in metrics:
                if score[metric] is not None:
                    totals[metric] += score[metric]
                    summary.counts[metric] += 1
    summary.means = {m: (totals[m] / summary.counts[m] if summary.counts[m] else None) for m in metrics}
    return scores, summary


def score_table(
    table: Any,
    metrics: Sequence[str] | None = None,
    prediction_column: str | None = None,
    ground_truth_column: str = "ground_truth",
) -> tuple[Any, ScoreSummary]:
    """A results table with a `score` column (a struct of one float per metric) added, and the summary."""
    import pyarrow as pa

    metrics = check_metrics(metrics)
    scores, summary = score_rows(table.to_pylist(), metrics, prediction_column, ground_truth_column)
    score_type = pa.struct([(m, pa.float64()) for m in metrics])
    column = pa.array(scores, type=score_type)
    if "score" in table.column_names:
        table = table.drop_columns(["score"])
    return table.append_column("score", column), summary


def print_summary(console: Any, summary: ScoreSummary) -> None:
    from rich.table import Table

    table = Table()
    table.add_column("metric")
    table.add_column("mean", justify="right")
    table.add_column("rows", justify="right")
    for metric, mean in summary.means.items():
        table.add_row(metric, "-" if mean is None else f"{mean:.3f}", str(summary.counts[metric]))
    console.print(table)
    failed = f"; {summary.failed} failed and scored 0" if summary.failed else ""
    console.print(f"{summary.scored} of {summary.rows} rows have a ground truth{failed}")


# ---------------------------------------------------------------- files and the command

RESULT_FORMATS = (".parquet", ".jsonl")


def _format_of(path: str, what: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in RESULT_FORMATS:
        raise InputError(f"cannot tell the format of {what} {path}", "use a .parquet or .jsonl file")
    return suffix


def read_results(path: str) -> tuple[list[dict[str, Any]], Any]:
    """The rows of a results file and, for Parquet, its table (which keeps the run's metadata)."""
    fmt = _format_of(path, "results file")
    if not Path(path).is_file():
        raise InputError(f"results file {path} does not exist", "check the path")
    if fmt == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{path} is not a readable Parquet file ({exc})", "pass a results file shardgen wrote") from None
        return table.to_pylist(), table
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise InputError(f"line {number} of {path} is not JSON ({exc.msg})", "pass a results file shardgen wrote") from None
    return rows, None


def write_scored(path: str, rows: list[dict[str, Any]], scores: list[dict[str, float | None] | None], table: Any, metrics: Sequence[str]) -> None:
    if _format_of(path, "output") == ".jsonl":
        with open(path, "w", encoding="utf-8") as handle:
            for row, score in zip(rows, scores):
                handle.write(json.dumps({**row, "score": score}, ensure_ascii=False, default=str) + "\n")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    if table is None:
        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(f"the rows do not fit one Parquet schema ({exc})", "write the scores to a .jsonl file") from None
    score_type = pa.struct([(m, pa.float64()) for m in metrics])
    if "score" in table.column_names:
        table = table.drop_columns(["score"])
    pq.write_table(table.append_column("score", pa.array(scores, type=score_type)), path)


@click.command("score")
@click.argument("results")
@click.option("-o", "--output", help="Write the results with a `score` column here (.parquet or .jsonl).")
@click.option("--metric", "metrics", multiple=True, type=click.Choice(METRICS),
              help="A metric to compute (repeat for several) [default: all].")
@click.option("--prediction-column", help="Column of answers [default: generation, or predicted_answer].")
@click.option("--ground-truth-column", default="ground_truth", show_default=True, help="Column of reference answers.")
@click.option("--field", metavar="NAME", help="Score this field of the `parsed` column (a --json-schema run; dotted "
              "for nested fields, e.g. details.topic) instead of the text.")
@click.option("--json", "as_json", is_flag=True, help="Print {metric: mean} as JSON instead of a table.")
@one_line_errors
def score(results: str, output: str | None, metrics: tuple[str, ...], prediction_column: str | None,
          ground_truth_column: str, field: str | None, as_json: bool) -> None:
    """Score RESULTS (a .parquet or .jsonl file written by run, collect or the Inferencer) against its ground truth."""
    from .command_support import console

    chosen = check_metrics(metrics)
    rows, table = read_results(results)
    scores, summary = score_rows(rows, chosen, prediction_column, ground_truth_column, field)
    if output:
        write_scored(output, rows, scores, table, chosen)
    if as_json:
        click.echo(json.dumps(summary.means))
    else:
        print_summary(console, summary)
        if output:
            console.print(f"wrote {len(rows)} rows with their score to {output}")
