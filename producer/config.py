"""Options from a TOML file and from flags, merged into one RunSpec (flags win over the file).

The file may be flat (`temperature = 0.7`) or use tables ([generation], [model], [columns],
[quantization_config]); it also takes the names users bring from fine-tuning suites.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any, Mapping

from shardgen.schemas.errors import InvalidParameter
from shardgen.schemas.model import ModelSpec, pinned_engine
from shardgen.schemas.run import ColumnMapping, RunSpec
from shardgen.schemas.runtime import RuntimeOptions
from shardgen.schemas.sampling import ALIASES as PARAM_ALIASES
from shardgen.schemas.sampling import SamplingParams

CONFIG_ALIASES = {
    "question_column": "prompt_column",
    "system_prompt_column": "system_column",
    "max_sequence_length": "max_prompt_tokens",
    "model_id": "model",
    "model_name": "model",
    "input_file": "input",
    "dataset": "input",
    "output_file": "output",
    "split_name": "split",
    "config_name": "subset",
    "dataset_config": "subset",
}
TABLES = ("generation", "sampling", "params", "model", "columns", "run", "worker")

COLUMN_FIELDS = {f.name for f in dataclasses.fields(ColumnMapping)}
MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelSpec)}
PARAM_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)} | set(PARAM_ALIASES) | {"do_sample", "use_cache"}
RUN_FIELDS = {"input", "split", "subset", "revision", "limit", "shard_size", "chat_template", "max_prompt_tokens", "max_retries",
              "input_format"}
RUNTIME_FIELDS = {"device", "engine", "batch_size", "max_memory", "compile", "hf_token", "grace_seconds", "stall_seconds",
                  "shards_in_flight",
                  "gpus_per_worker",
                  "work_dir", "broker", "output", "allow_partial", "storage_options", "metrics_port", "metrics_host",
                  "log_format", "loglevel", "name", "output_format"}
MODEL_OPTIONS = (MODEL_FIELDS - {"revision", "engine"}) | {"model_revision"}
"""ModelSpec's fields as options; its `revision` is `model_revision` (`revision` names the dataset's)."""
BNB_SHORTCUTS = {"load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype"}
ALL_FIELDS = COLUMN_FIELDS | MODEL_OPTIONS | PARAM_FIELDS | RUN_FIELDS | RUNTIME_FIELDS


def load_config(path: str | Path | None) -> dict[str, Any]:
    """A flat dict of canonical option names from a TOML file (empty without one)."""
    if path is None:
        return {}
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidParameter(f"config file {path} does not exist", "check the --config path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidParameter(f"config file {path} is not valid TOML: {exc}", "fix the file") from None
    from shardgen.compat.config_files import translate  # a file written for a tool shardgen replaces

    return normalize(translate(raw, str(path)), source=str(path))


def normalize(raw: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    quantization: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "quantization_config":
            if not isinstance(value, Mapping):
                raise InvalidParameter(f"quantization_config in {source} must be a table")
            quantization.update(value)
        elif key == "storage_options":
            if not isinstance(value, Mapping):
                raise InvalidParameter(f"storage_options in {source} must be a table")
            flat[key] = dict(value)
        elif key in TABLES and isinstance(value, Mapping):
            if key == "model" and "revision" in value:  # inside [model], revision is the model's
                value = {("model_revision" if k == "revision" else k): v for k, v in value.items()}
            nested = normalize(value, source)
            quantization.update(nested.pop("quantization_config", {}))
            flat.update(nested)
        elif key in BNB_SHORTCUTS:
            quantization[key] = value
        else:
            name = CONFIG_ALIASES.get(key, key)
            if name not in ALL_FIELDS:
                raise InvalidParameter(f"unknown option {key!r} in {source}", "see `shardgen run --help` for the names")
            flat[name] = value
    if quantization:
        flat["quantization_config"] = quantization
    return flat


def merge(file_options: Mapping[str, Any], flag_options: Mapping[str, Any]) -> dict[str, Any]:
    """Flags given on the command line (not None) override the file; quantization fields override field by field."""
    merged = dict(file_options)
    for key, value in flag_options.items():
        if value is None or value == ():
            continue
        if key == "quantization_config":
            value = {**merged.get(key, {}), **parse_quantization_config(value)}
        if key == "storage_options":
            from shardgen.workers.storage import parse_storage_options

            value = {**merged.get(key, {}), **parse_storage_options(value)}
        merged[key] = value
    return merged


def parse_quantization_config(value: str | Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a --quantization-config flag: a JSON object (already a mapping from the Python API)."""
    if isinstance(value, Mapping):
        return dict(value)
    example = """'{"load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}' or '{"bits": 4, "dataset": "calib.jsonl"}'"""
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise InvalidParameter(f"--quantization-config is not valid JSON ({exc.msg})", f"pass a JSON object such as {example}") from None
    if not isinstance(parsed, dict):
        raise InvalidParameter("--quantization-config must be a JSON object", f"pass one such as {example}")
    return parsed


def _given(options: Mapping[str, Any], names: set[str]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k in names and v is not None}


def load_json_schema(value: Any) -> Any:
    """--json-schema / json_schema: a schema object, its JSON text, or the path of a file holding it."""
    if not isinstance(value, str) or value.lstrip().startswith("{"):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise InvalidParameter(f"--json-schema {value!r} is neither a JSON object nor a file",
                               "pass a .json file holding the schema, or the schema itself as '{...}'")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidParameter(f"--json-schema file {path} is not valid JSON ({exc})", "fix the file") from None


def sampling_fields(options: Mapping[str, Any]) -> dict[str, Any]:
    """The generation parameters among merged options: a schema file read, a comma-separated choice split."""
    fields = _given(options, PARAM_FIELDS)
    if "json_schema" in fields:
        fields["json_schema"] = load_json_schema(fields["json_schema"])
    if isinstance(fields.get("choice"), str):
        fields["choice"] = [c.strip() for c in fields["choice"].split(",") if c.strip()]
    return fields


def build_model_spec(options: Mapping[str, Any], *, engine: str | None = None) -> ModelSpec:
    """The validated ModelSpec for merged options (run, submit and worker share it); `engine` is the one a run
    pins, or the one a worker serves (schemas/model.py pinned_engine)."""
    fields = _given(options, MODEL_OPTIONS)
    if "model_revision" in fields:
        fields["revision"] = fields.pop("model_revision")
    return ModelSpec(**fields, engine=engine)


def build_runtime(options: Mapping[str, Any]) -> RuntimeOptions:
    """The validated RuntimeOptions for merged options, the environment filling what they leave out."""
    return RuntimeOptions.from_options(options)


def build_run_spec(options: Mapping[str, Any], **fixed: Any) -> RunSpec:
    """The validated RunSpec for merged options; every invalid value is refused here, before any work."""
    if "input" not in options or not options["input"]:
        raise InvalidParameter("no input given", "pass a dataset file, directory or hub name as INPUT")
    run_fields = _given(options, RUN_FIELDS)
    run_fields["input"] = str(run_fields["input"])
    params = SamplingParams.from_mapping(sampling_fields(options))
    if params.constraint is not None:
        from shardgen.workers.engine.constraints import check_constraint

        check_constraint(params)
    return RunSpec(
        columns=ColumnMapping(**_given(options, COLUMN_FIELDS)),
        model=build_model_spec(options, engine=pinned_engine(options.get("engine"))),
        params=params,
        **run_fields,
        **fixed,
    )
