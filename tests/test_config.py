import pytest

from shardgen.producer.config import build_run_spec, load_config, merge
from shardgen.schemas.errors import InvalidParameter


def test_toml_accepts_fine_tuning_suite_names(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        """
input = "data.jsonl"
question_column = "q"
ground_truth_column = "a"
system_prompt_column = "sys"
max_sequence_length = 512
load_in_4bit = true
bnb_4bit_use_double_quant = true

[generation]
temperature = 0.7
top_p = 0.9
num_return_sequences = 2
"""
    )
    spec = build_run_spec(load_config(path))
    assert spec.columns.prompt_column == "q"
    assert spec.columns.ground_truth_column == "a"
    assert spec.columns.system_column == "sys"
    assert spec.max_prompt_tokens == 512
    assert spec.model.quantize == "nf4"
    assert spec.model.quantization_config["bnb_4bit_use_double_quant"] is True
    assert (spec.params.temperature, spec.params.top_p, spec.params.n) == (0.7, 0.9, 2)


def test_load_in_8bit_and_quantization_config_table(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('input = "d.jsonl"\nload_in_8bit = true\n')
    assert build_run_spec(load_config(path)).model.quantize == "int8"
    path.write_text('input = "d.jsonl"\n[quantization_config]\nload_in_4bit = true\nbnb_4bit_quant_type = "fp4"\nbnb_4bit_compute_dtype = "bfloat16"\n')
    spec = build_run_spec(load_config(path))
    assert spec.model.quantize == "fp4" and spec.model.quantization_config["bnb_4bit_compute_dtype"] == "bfloat16"


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('input = "d.jsonl"\ntemperature = 0.2\nshard_size = 10\n')
    merged = merge(load_config(path), {"temperature": 0.9, "shard_size": None, "stop": ()})
    spec = build_run_spec(merged)
    assert spec.params.temperature == 0.9 and spec.shard_size == 10


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('input = "d.jsonl"\ntemperture = 1\n', "unknown option 'temperture'"),
        ('input = "d.jsonl"\ntemperature = "hot"\n', "temperature must be a number"),
        ('input = "d.jsonl"\ntop_p = 2\n', "top_p must be <= 1"),
        ('input = "d.jsonl"\nshard_size = 0\n', "shard_size must be a positive integer"),
        ("input = [", "not valid TOML"),
    ],
)
def test_bad_toml_values_are_refused_with_the_name(tmp_path, text, fragment):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(InvalidParameter) as info:
        build_run_spec(load_config(path))
    assert fragment in str(info.value)


def test_missing_config_file():
    with pytest.raises(InvalidParameter, match="config file nope.toml does not exist"):
        load_config("nope.toml")


def test_a_fine_tuning_suites_inferencer_file_and_use_cache_are_taken_as_they_are(tmp_path):
    from shardgen.producer.config import build_run_spec, load_config
    from shardgen.schemas.errors import InvalidParameter

    path = tmp_path / "config.toml"
    path.write_text('[inferencer]\nquestion_column = "input"\nground_truth_column = "output"\nmax_new_tokens = 8\n'
                    'temperature = 0.0\nuse_cache = true\nmodel = "smollm2-135m"\n')
    options = load_config(path)
    spec = build_run_spec({**options, "input": "test.jsonl"})
    assert (spec.columns.prompt_column, spec.columns.ground_truth_column) == ("input", "output")
    assert spec.params.max_new_tokens == 8 and spec.model.model == "smollm2-135m"
    (tmp_path / "g.toml").write_text('input = "x.jsonl"\n[generation]\nuse_cache = "sometimes"\n')
    with pytest.raises(InvalidParameter, match="use_cache must be true or false"):
        build_run_spec(load_config(tmp_path / "g.toml"))
