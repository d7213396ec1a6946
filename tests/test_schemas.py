import json

import pytest

from shardgen.schemas.errors import InvalidParameter, MessageError
from shardgen.schemas.model import ModelSpec
from shardgen.schemas.run import ColumnMapping, RunSpec
from shardgen.schemas.sampling import SamplingParams
from shardgen.schemas.shard import TakeShard, check_run_id


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("temperature", -1, "temperature must be >= 0"),
        ("top_p", 2, "top_p must be <= 1"),
        ("top_p", 0, "top_p must be > 0"),
        ("top_k", -3, "top_k must be >= 0"),
        ("min_p", 1.5, "min_p must be <= 1"),
        ("max_new_tokens", 0, "max_new_tokens must be >= 1"),
        ("n", 0, "n must be >= 1"),
        ("repetition_penalty", 0, "repetition_penalty must be > 0"),
        ("temperature", "hot", "temperature must be a number"),
        ("temperature", float("inf"), "temperature must be a finite number, got inf"),
        ("repetition_penalty", float("inf"), "repetition_penalty must be a finite number"),
        ("length_penalty", float("-inf"), "length_penalty must be a finite number"),
        ("max_new_tokens", 2.5, "max_new_tokens must be an integer"),
        ("seed", -1, "seed must be >= 0"),
        ("early_stopping", "yes", "early_stopping must be true or false"),
    ],
)
def test_invalid_sampling_values_name_the_parameter(field, value, fragment):
    with pytest.raises(InvalidParameter) as info:
        SamplingParams.from_mapping({field: value})
    assert fragment in str(info.value)


def test_sampling_aliases_from_other_tools():
    params = SamplingParams.from_mapping(
        {"num_return_sequences": 3, "max_tokens": 12, "do_sample": True, "stop_sequences": "###", "temperature": 0.5}
    )
    assert (params.n, params.max_new_tokens, params.temperature, params.stop) == (3, 12, 0.5, ("###",))
    assert SamplingParams.from_mapping({"do_sample": False, "temperature": 0.9}).greedy
    assert SamplingParams.from_mapping({"do_sample": True}).temperature == 1.0


def test_unknown_sampling_parameter_is_refused():
    with pytest.raises(InvalidParameter, match="unknown generation parameter 'temprature'"):
        SamplingParams.from_mapping({"temprature": 0.3})


def test_sampling_params_json_round_trip_and_budget():
    params = SamplingParams(temperature=0.7, top_p=0.9, stop=["a", "b"], seed=5, max_length=40, max_new_tokens=30)
    again = SamplingParams.from_json(params.to_json())
    assert again == params
    assert params.new_token_budget(prompt_tokens=25) == 15
    assert params.new_token_budget(prompt_tokens=5) == 30


def test_model_spec_quantization_config_implies_method_and_is_checked():
    assert ModelSpec(quantization_config={"load_in_8bit": True}).quantize == "int8"
    spec = ModelSpec(quantization_config={"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"})
    assert spec.quantize == "fp4" and spec.queue == "sg.q.smollm2-135m@fp4"
    assert ModelSpec(quantize=True).quantize == "nf4"
    with pytest.raises(InvalidParameter, match="unknown quantization 'int3'"):
        ModelSpec(quantize="int3")
    with pytest.raises(InvalidParameter, match="unknown quantization_config field 'bits_per_weight'"):
        ModelSpec(quantization_config={"bits_per_weight": 4})
    with pytest.raises(InvalidParameter, match="bnb_4bit_compute_dtype"):
        ModelSpec(quantize="nf4", quantization_config={"bnb_4bit_compute_dtype": "float8"})


def test_model_slug_is_safe_for_queue_and_file_names():
    assert ModelSpec(model="/data/ckpts/../run 1/").slug == "data_ckpts_.._run_1"
    assert "/" not in ModelSpec(model="org/name").slug


def test_run_spec_round_trip_keeps_seed_and_row_seeds_depend_only_on_row():
    spec = RunSpec(input="x.jsonl", columns=ColumnMapping(keep_columns="a, b"), params=SamplingParams(temperature=0.8))
    again = RunSpec.from_json(spec.to_json())
    assert again == spec
    assert again.columns.keep_columns == ("a", "b")
    assert spec.row_seed(7) == again.row_seed(7) != spec.row_seed(8)
    seeded = RunSpec(input="x.jsonl", params=SamplingParams(seed=11))
    assert seeded.base_seed == 11


def test_run_ids_cannot_escape_the_work_directory():
    for bad in ["../etc", "a/b", "", ".hidden", "x" * 65, "20260101-abc_1\n"]:  # a trailing newline too
        with pytest.raises(MessageError):
            check_run_id(bad)
    assert check_run_id("20260101-abc_1") == "20260101-abc_1"


def test_take_shard_message_round_trip_and_rejection_of_foreign_payloads():
    message = TakeShard("sg.q.smollm2-135m@nf4")
    assert TakeShard.from_dict(json.loads(json.dumps(message.to_dict()))) == message
    for payload in [None, [], "sg.q.x", {}, {"queue": 3}, {"queue": "sg.q.x", "rows": []}, {"queue": "a b"},
                    {"queue": "x" * 201}, {"run_id": "r", "shard_index": 0, "rows": []}]:
        with pytest.raises(MessageError):
            TakeShard.from_dict(payload)


def test_run_difference_names_what_would_change_the_results():
    base = RunSpec(input="x.jsonl", params=SamplingParams(temperature=0.7))
    assert base.difference(RunSpec(input="x.jsonl", params=SamplingParams(temperature=0.7))) is None
    assert base.difference(RunSpec(input="x.jsonl", params=SamplingParams(temperature=0.2))) == "generation parameters"
    assert base.difference(RunSpec(input="x.jsonl", model=ModelSpec(quantize="nf4"), params=base.params)).startswith("quantization")
    assert base.difference(RunSpec(input="y.jsonl", params=base.params)) == "input (x.jsonl then y.jsonl)"


def test_the_weights_identity_decides_the_queue():
    from shardgen.schemas.model import identity_difference

    plain = ModelSpec(model="org/model", quantize="nf4")
    assert plain.queue == "sg.q.org_model@nf4"  # nothing but the name and the method: the queue it always had
    variants = [
        ModelSpec(model="org/model", quantize="nf4", revision="v2"),
        ModelSpec(model="org/model", quantize="nf4", quantization_config={"bnb_4bit_use_double_quant": True}),
        ModelSpec(model="org/model", quantize="nf4", quantization_config={"bnb_4bit_compute_dtype": "float16"}),
        ModelSpec(model="org/model", quantize="nf4", dtype="float16"),
        ModelSpec(model="org/model", quantize="nf4", engine="hf-generate"),
    ]
    queues = {spec.queue for spec in variants}
    assert len(queues) == len(variants) and plain.queue not in queues
    assert ModelSpec(model="org/model", quantize="nf4", revision="v2").queue == variants[0].queue
    assert ModelSpec(model="org/model", quantization_config={"load_in_4bit": True}).queue == plain.queue  # restates nf4
    long_a, long_b = ModelSpec(model="a" * 10 + "x" * 90), ModelSpec(model="b" * 10 + "x" * 90)
    assert long_a.queue != long_b.queue  # same last 80 characters, different models
    assert identity_difference(variants[0].identity, plain.identity) == "revision none, the run wants v2"
    assert "--model-revision v2" in variants[0].worker_flags()
    with pytest.raises(InvalidParameter, match="cannot ask for engine"):
        ModelSpec(engine="auto")
