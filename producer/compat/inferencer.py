"""A fine-tuning suite's `Inferencer`: a TOML file's [inferencer] section names a model and a test set; `run()`
answers every question and writes `inferencer_output.jsonl` rows of
`{question, predicted_answer, ground_truth, metadata{model_id, inference_time, token_count, generation_config}}`.

    inferencer = Inferencer(config_manager=ConfigManager("custom_config.toml"))
    results = inferencer.run()

`run()` goes through shardgen's embedded run (`shardgen run`): the set is sharded, an interrupted run resumes
where it stopped, and the full result (every shardgen column) is kept beside the JSONL as Parquet.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

from shardgen.schemas.errors import InvalidParameter
from shardgen.schemas.run import RunSpec
from shardgen.schemas.sampling import SamplingParams

SECTION = "inferencer"
DEFAULT_OUTPUT = "inferencer_output.jsonl"

# The suite's [inferencer] keys that shardgen names otherwise; the rest (max_new_tokens, temperature, min_p,
# load_in_4bit, dtype, ...) already have shardgen's names.
RENAMED = {
    "testing_data_id": "input",
    "question_column": "prompt_column",
    "system_prompt_column": "system_column",
    "system_prompt_override_text": "system_prompt",
    "max_sequence_length": "max_prompt_tokens",
}
MODEL_KEYS = ("model", "model_id", "model_path")
NAMING_KEYS = ("hf_user_id", "run_name", "run_name_prefix", "run_name_suffix")
"""How the suite names the model it trained: hf_user_id/run_name (the prefix and suffix only named training runs)."""
RUNTIME_KEYS = ("output_file", "batch_size", "device", "hf_token")


class ConfigManager:
    """The suite's configuration file: TOML sections, `"${VAR}"` values read from the environment, and the
    string "null" read as None."""

    def __init__(self, config_path: str | os.PathLike = "config.toml"):
        self.config_path = Path(config_path)
        try:
            raw = tomllib.loads(self.config_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InvalidParameter(f"configuration file {self.config_path} does not exist", "check the path") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InvalidParameter(f"configuration file {self.config_path} is not valid TOML: {exc}", "fix the file") from None
        self._config = _resolved(raw)

    def get_section(self, section: str) -> dict[str, Any]:
        if section not in self._config or not isinstance(self._config[section], Mapping):
            raise InvalidParameter(
                f"configuration file {self.config_path} has no [{section}] section", f"add one with the {section} settings"
            )
        return dict(self._config[section])

    def get_value(self, section: str, key: str, default: Any = None) -> Any:
        return self.get_section(section).get(key, default)


def _resolved(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _resolved(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolved(item) for item in value]
    if value == "null":
        return None
    if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
        return os.environ.get(value[2:-1], value)
    return value


class Inferencer:
    """Reads the [inferencer] section of `config_manager` (default: ./config.toml) and runs it with shardgen."""

    def __init__(self, *, config_manager: ConfigManager | None = None, hf_token: str | None = None):
        self.config_manager = config_manager or ConfigManager()
        self.section = self.config_manager.get_section(SECTION)
        self.options = run_options(self.section, source=f"[{SECTION}] in {self.config_manager.config_path}")
        self.output_file = Path(self.section.get("output_file") or DEFAULT_OUTPUT)
        self.device = self.section.get("device") or "auto"
        self.batch_size = int(self.section.get("batch_size") or 16)
        self.hf_token = hf_token or self.section.get("hf_token")

    def run_spec(self) -> RunSpec:
        from shardgen.producer.config import build_run_spec

        return build_run_spec(self.options)

    def load_model_and_tokenizer(self) -> tuple[Any, Any]:
        from shardgen.producer.config import build_model_spec
        from shardgen.workers.models.loader import load_model

        loaded = load_model(build_model_spec(self.options), self.device, self.hf_token)
        return loaded.model, loaded.tokenizer

    def run(self) -> list[dict[str, Any]]:
        """Answer the whole test set; write and return the rows in input order."""
        import pyarrow.parquet as pq

        from shardgen.producer.embedded import run_embedded
        from shardgen.schemas.runtime import RuntimeOptions

        spec = self.run_spec()
        results = self.output_file.with_suffix(".parquet")
        runtime = RuntimeOptions.from_options({"device": self.device, "batch_size": self.batch_size, "hf_token": self.hf_token})
        run_embedded(spec, results, runtime)
        question_column = spec.columns.prompt_column or "question"
        rows = [
            inferencer_row(row, question_column, spec.model.model, spec.params)
            for row in pq.read_table(results).to_pylist()
        ]
        self.output_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.output_file, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        return rows


def run_options(section: Mapping[str, Any], source: str) -> dict[str, Any]:
    """shardgen's run options for an [inferencer] section, validated as `shardgen run --config` validates them."""
    from shardgen.producer.config import normalize

    section = {key: value for key, value in section.items() if value is not None}
    SamplingParams.from_mapping({"use_cache": section.pop("use_cache", True)})  # validated, then dropped
    for key in RUNTIME_KEYS:
        section.pop(key, None)
    for key in ("load_in_4bit", "load_in_8bit"):
        if section.get(key) is False:
            del section[key]
    if "system_prompt_override_text" in section:
        section.pop("system_prompt_column", None)  # the override text wins over a per-row system prompt
    model = _model_name(section, source)
    question_column = section.get("question_column", "question")
    translated = {RENAMED.get(key, key): value for key, value in section.items() if key not in NAMING_KEYS + MODEL_KEYS}
    translated["prompt_column"] = question_column
    translated["keep_columns"] = [question_column]  # the rows name their question
    options = normalize(translated, source=source)
    options["model"] = model
    return options


def _model_name(section: Mapping[str, Any], source: str) -> str:
    for key in MODEL_KEYS:
        if section.get(key):
            return str(section[key])
    if section.get("hf_user_id") and section.get("run_name"):
        return f"{section['hf_user_id']}/{section['run_name']}"
    raise InvalidParameter(
        f"{source} names no model",
        "set run_name (the model is then hf_user_id/run_name), or model = a checkpoint directory, a directory of "
        "checkpoints (the latest is used) or a hub id",
    )


def row_metadata(row: Mapping[str, Any], model_id: str, params: SamplingParams) -> dict[str, Any]:
    """The suite's per-row metadata for a shardgen result row; a failed row also says why."""
    metadata: dict[str, Any] = {
        "model_id": model_id,
        "inference_time": row.get("generation_time_s"),
        "token_count": row.get("generated_tokens"),
        "generation_config": params.to_dict(),
    }
    if row.get("error"):
        metadata["error"] = row["error"]
    return metadata


def inferencer_row(
    row: Mapping[str, Any], question_column: str, model_id: str, params: SamplingParams, output_column: str = "generation"
) -> dict[str, Any]:
    """A shardgen result row as the suite wrote it."""
    return {
        "question": row.get(question_column),
        "predicted_answer": row.get(output_column) or "",
        "ground_truth": row.get("ground_truth"),
        "metadata": row_metadata(row, model_id, params),
    }
