"""A fine-tuning suite's `Inferencer`: a TOML file's [inferencer] section names a model and a test set; `run()`
answers every question and writes `inferencer_output.jsonl` rows of
`{question, predicted_answer, ground_truth, metadata{model_id, inference_time, token_count, generation_config}}`.

    inferencer = Inferencer(config_manager=ConfigManager("custom_config.toml"))
    results = inferencer.run()
    responses = inferencer.generate_responses(inferencer.process_dataset(dataset))   # in order
    scores = Evaluator().run()                                       # with shardgen score's metrics

`run()` goes through shardgen's embedded run (`shardgen run`): the set is sharded, an interrupted run resumes
where it stopped, and the full result (every shardgen column) is kept beside the JSONL as Parquet.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Mapping

from shardgen.schemas.errors import InputError, InvalidParameter, OutOfMemoryError
from shardgen.schemas.rows import ResolvedColumns, to_input_row
from shardgen.schemas.run import RunSpec
from shardgen.schemas.sampling import SamplingParams
from shardgen.workers.generation import EngineOOM, GenerationRequest, Generator
from shardgen.workers.models.loader import LoadedModel
from shardgen.workers.shard_processing import generate_halving_on_oom
from shardgen.workers.streaming import text_stream, token_stream

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

    def has_section(self, section: str) -> bool:
        return isinstance(self._config.get(section), Mapping)

    def get_section(self, section: str) -> dict[str, Any]:
        if not self.has_section(section):
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
    """Reads the [inferencer] section of `config_manager` (default: ./config.toml) and runs it with shardgen.

    `config` holds the section's keys as attributes (`inferencer.config.max_new_tokens`); a change to it (the
    batch size, max_sequence_length, a sampling parameter) applies from the next call. The model is loaded
    once, on first use, and serves `process_dataset`, `generate_responses`, `stream_inference`, `model` and
    `tokenizer`; `run()` goes through shardgen's embedded run, which loads its own."""

    def __init__(self, *, config_manager: ConfigManager | None = None, hf_token: str | None = None):
        self.config_manager = config_manager or ConfigManager()
        self.config = SimpleNamespace(**self.config_manager.get_section(SECTION))
        self.source = f"[{SECTION}] in {self.config_manager.config_path}"
        run_options(self.section, source=self.source)  # a bad section is refused now, before any model loads
        self.hf_token = hf_token or self.section.get("hf_token")
        self._loaded: LoadedModel | None = None
        self._generator: Generator | None = None

    @property
    def section(self) -> dict[str, Any]:
        return dict(vars(self.config))

    @property
    def options(self) -> dict[str, Any]:
        """shardgen's run options for the section as it is now."""
        return run_options(self.section, source=self.source)

    @property
    def output_file(self) -> Path:
        return Path(self.section.get("output_file") or DEFAULT_OUTPUT)

    @property
    def device(self) -> str:
        return self.section.get("device") or "auto"

    @property
    def batch_size(self) -> int:
        size = self.section.get("batch_size")
        size = 16 if size is None else size
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise InvalidParameter(f"batch_size in {self.source} must be a positive integer, got {size!r}")
        return size

    def run_spec(self) -> RunSpec:
        from shardgen.producer.config import build_run_spec

        return build_run_spec(self.options)

    # ------------------------------------------------------------ the model
    def load_model_and_tokenizer(self) -> tuple[Any, Any]:
        """The model and tokenizer, loaded once. A model that cannot be found raises ModelNotFoundError;
        running out of memory while loading raises OutOfMemoryError."""
        import torch
        from shardgen.producer.config import build_model_spec
        from shardgen.workers.models.loader import load_model

        if self._loaded is None:
            spec = build_model_spec(self.options)
            try:
                self._loaded = load_model(spec, self.device, self.hf_token)
            except (MemoryError, torch.cuda.OutOfMemoryError) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise OutOfMemoryError(
                    f"loading model {spec.model} ran out of memory ({reason})",
                    f"set load_in_4bit = true in {self.source}, or use a smaller model",
                ) from None
        return self._loaded.model, self._loaded.tokenizer

    @property
    def model(self) -> Any:
        return self.load_model_and_tokenizer()[0]

    @property
    def tokenizer(self) -> Any:
        return self.load_model_and_tokenizer()[1]

    # ------------------------------------------------------------ prompts and answers
    def process_dataset(self, dataset: Any) -> list[str]:
        """Prompts ready for generation, one per row in order: the question column (question_column), a
        system prompt (system_prompt_override_text, else the row's system_prompt_column) and the model's chat
        template.

        `dataset` is a `datasets.Dataset`, a list of rows (dicts), or a dict of columns (a batch,
        `dataset[:8]`). The prompts are whole: the engine batches them itself, and `max_sequence_length` cuts
        them at generation."""
        from shardgen.workers.prompts import conversation, render_prompt

        records, available = _records(dataset)
        spec = self._spec()
        named = {"question_column": spec.columns.prompt_column,
                 "system_prompt_column": spec.columns.system_column}
        for key, column in named.items():
            if column is not None and records and column not in available:
                raise InputError(
                    f"column {column!r} ({key} in {self.source}) is not in the dataset",
                    f"available columns: {', '.join(available)}",
                )
        resolved = ResolvedColumns(spec.columns.prompt_column, None)
        tokenizer = self.tokenizer
        prompts = []
        for index, record in enumerate(records):
            row = to_input_row(index, record, spec.columns, resolved)
            if row.error:
                raise InputError(f"row {index} of the dataset: {row.error}", "every row needs a question")
            messages = conversation(row, spec.columns.system_prompt)
            prompts.append(render_prompt(tokenizer, messages, spec.chat_template).text)
        return prompts

    def generate_responses(self, data: Any) -> list[str]:
        """The answers, in order, generated in batches of `batch_size` by shardgen's engine. `data` is what
        `process_dataset` returns (strings are taken as prompts ready for generation), or a dataset or rows,
        which are processed first. A batch that runs out of memory is halved and redone; out of memory one row
        at a time raises OutOfMemoryError."""
        prompts = list(data) if _all_strings(data) else self.process_dataset(data)
        spec = self._spec()
        generator = self._engine()
        requests = [GenerationRequest(self._prompt_ids(p, spec), seed=spec.row_seed(i))
                    for i, p in enumerate(prompts)]
        try:
            outputs, _ = generate_halving_on_oom(generator, requests, spec, on_row=None)
        except EngineOOM as exc:
            raise OutOfMemoryError(
                f"generation ran out of memory even one row at a time ({exc})",
                f"lower max_sequence_length or max_new_tokens in {self.source}, or set load_in_4bit = true",
            ) from None
        for index, output in enumerate(outputs):
            if output.error:
                raise InputError(f"prompt {index} could not be answered: {output.error}")
        return [output.samples[0].text for output in outputs]

    def stream_inference(self, prompt: str) -> Iterator[str]:
        """The answer to one prompt (as `process_dataset` makes them) in pieces of text as it is generated."""
        spec = self._spec()
        request = GenerationRequest(self._prompt_ids(prompt, spec), seed=spec.row_seed(0))
        yield from text_stream(self.tokenizer, token_stream(self._engine(), request, spec.params), spec.params.stop)

    def _spec(self) -> RunSpec:
        """The run spec of the section as it is now; a dataset given in memory needs no testing_data_id."""
        from shardgen.producer.config import build_run_spec

        options = self.options
        options.setdefault("input", "(in memory)")
        return build_run_spec(options)

    def _engine(self) -> Generator:
        from shardgen.workers.generators import make_generator

        self.load_model_and_tokenizer()
        if self._generator is None:
            self._generator = make_generator(self._loaded, self.batch_size)  # type: ignore[arg-type]
        self._generator.batch_size = self.batch_size
        return self._generator

    def _prompt_ids(self, prompt: str, spec: RunSpec) -> list[int]:
        from shardgen.workers.prompts import tokenize_text

        tokenizer = self.tokenizer
        templated = spec.chat_template and bool(getattr(tokenizer, "chat_template", None))
        limit = spec.max_prompt_tokens
        return tokenize_text(tokenizer, prompt, max_prompt_tokens=limit, templated=templated).ids

    # ------------------------------------------------------------ the whole test set
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


def _records(dataset: Any) -> tuple[list[Mapping[str, Any]], list[str]]:
    """The rows of a datasets.Dataset, a list of dicts or a dict of columns, and the columns they have."""
    if hasattr(dataset, "column_names") and hasattr(dataset, "to_list"):
        return dataset.to_list(), list(dataset.column_names)
    if isinstance(dataset, Mapping):
        if hasattr(dataset, "column_names") or not all(isinstance(v, list | tuple) for v in dataset.values()):
            raise InputError(
                "process_dataset takes one split of a dataset, or a dict of columns of equal length",
                "pick a split (dataset['test']) or pass lists as the column values",
            )
        lengths = {len(v) for v in dataset.values()}
        if len(lengths) > 1:
            raise InputError(f"the columns have different lengths ({', '.join(map(str, sorted(lengths)))})")
        columns = list(dataset)
        return [dict(zip(columns, values)) for values in zip(*dataset.values())], columns
    if isinstance(dataset, (list, tuple)) and all(isinstance(row, Mapping) for row in dataset):
        return list(dataset), list(dict.fromkeys(key for row in dataset for key in row))
    raise InputError(
        "process_dataset takes a datasets.Dataset, a list of rows (dicts) or a dict of columns, "
        f"got {type(dataset).__name__}"
    )


def _all_strings(data: Any) -> bool:
    return isinstance(data, (list, tuple)) and bool(data) and all(isinstance(item, str) for item in data)


def run_options(section: Mapping[str, Any], source: str) -> dict[str, Any]:
    """shardgen's run options for an [inferencer] section, validated as `shardgen run --config` validates
    them. `"null"` and `"${VAR}"` values are read as ConfigManager reads them, so `shardgen run --config`
    takes the suite's file as it is."""
    from shardgen.producer.config import normalize

    section = {key: value for key, value in _resolved(section).items() if value is not None}
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
