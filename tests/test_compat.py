"""shardgen.compat: code written for the classes shardgen replaces runs with only its import line changed.

Each test is the seed document's own usage, pointed at a tiny random model instead of a hub id."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from shardgen.schemas.errors import InvalidParameter, ModelError
from tests.conftest import write_jsonl
from tests.tiny_architectures import build_architecture
from tests.tiny_model import build_tiny_model

QUESTIONS = [
    {"question": "What is the capital of France?", "answer": "Paris", "system": "Be brief."},
    {"question": "How many legs does a spider have?", "answer": "8", "system": "Be brief."},
    {"question": "Name a primary color.", "answer": "red", "system": "Be brief."},
]


def test_inference_like_finetuning_suite(tiny_model_dir):
    from shardgen.compat import Inference

    inference = Inference(model_id=str(tiny_model_dir))  # device=None, max_length=20, no quantization
    assert inference.device == "cpu" and inference.max_length == 20
    prompt_text = "Once upon a time"
    generated_text = inference(prompt_text)
    assert isinstance(generated_text, str) and generated_text.startswith(prompt_text)  # prompt + continuation

    inference = Inference(model_id=str(tiny_model_dir), max_length=50, temperature=0)
    text = inference.run("In a land far, far away", max_length=30)
    (completion,) = inference.llm.generate("In a land far, far away", max_length=30, max_new_tokens=30)
    assert completion.prompt_tokens + completion.generated_tokens == 30  # max_length caps prompt + answer
    assert text == inference.tokenizer.decode(completion.prompt_ids + completion.samples[0].token_ids, skip_special_tokens=True)
    with pytest.raises(InvalidParameter, match="max_length=3 leaves no room to generate"):
        inference(prompt_text, max_length=3)


def test_inference_quantized_with_the_seed_config(tiny_model_dir):
    from shardgen.compat import Inference

    quantization_config = {
        "load_in_4bit": True,
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_compute_dtype": torch.bfloat16,
    }
    inference = Inference(model_id=str(tiny_model_dir), quantize=True, quantization_config=quantization_config)
    assert inference.llm.loaded.spec.quantize == "nf4"
    assert inference.llm.loaded.spec.quantization_config["bnb_4bit_use_double_quant"] is True
    assert inference("Once upon a time").startswith("Once upon a time")
    default = Inference(model_id=str(tiny_model_dir), quantize=True)  # the original's default 4-bit config
    assert default.llm.loaded.spec.quantization_config["bnb_4bit_compute_dtype"] == "bfloat16"


@pytest.fixture(scope="module")
def tiny128_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny128") / "model", hidden=128)


def test_gptq_inference_calibrates_once_on_the_dataset(tiny128_dir, tmp_path, monkeypatch):
    from shardgen.compat import GPTQInference

    monkeypatch.setenv("SHARDGEN_CACHE_DIR", str(tmp_path / "cache"))
    texts = ["The river slowed as it reached the plain, and the farmers watched the water rise.",
             "Merchants carried salt, cloth and iron along the old road between two market towns."]
    dataset = write_jsonl(tmp_path / "calib.jsonl", [{"text": texts[i % 2] * 2} for i in range(16)])
    inference_engine = GPTQInference(str(tiny128_dir), quantization_config_bits=4, quantization_config_dataset=str(dataset), max_length=40)
    assert inference_engine.llm.loaded.info["checkpoint_quantization"] == "compressed-tensors"
    assert "gptq-" in inference_engine.llm.loaded.source  # the calibrated checkpoint, cached
    output_text = inference_engine.generate("Once upon a time")
    assert output_text.startswith("Once upon a time")

    # Without a dataset: calibrated on the sample shipped with shardgen, cached apart from the dataset's.
    builtin = GPTQInference(str(tiny128_dir), quantization_config_bits=3, max_length=12)
    assert builtin.llm.loaded.source != inference_engine.llm.loaded.source
    quant = json.loads((Path(builtin.llm.loaded.source) / "config.json").read_text())["quantization_config"]
    assert quant["config_groups"]["group_0"]["weights"]["num_bits"] == 3
    assert builtin.generate("Once upon a time").startswith("Once upon a time")

    # A GPTQ checkpoint loads as it is: the bits are its own, and it is not calibrated again.
    again = GPTQInference(builtin.llm.loaded.source, quantization_config_bits=8, max_length=12)
    assert again.llm.loaded.source == builtin.llm.loaded.source


@pytest.mark.parametrize("bits", [1, 5, 16, "4"])
def test_gptq_inference_refuses_bits_it_cannot_make_before_loading(bits):
    from shardgen.compat import GPTQInference

    with pytest.raises(InvalidParameter) as info:
        GPTQInference("/no/such/model", quantization_config_bits=bits)
    assert info.value.line() == f"quantization_config_bits must be one of 2, 3, 4, 8, got {bits!r}"


@pytest.fixture(scope="module")
def falcon_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_architecture("falcon-7b-layout", tmp_path_factory.mktemp("falcon") / "model")


def test_falcon_inference_like_the_pipeline(falcon_dir):
    from transformers import BitsAndBytesConfig

    from shardgen.compat import FalconInference

    quant_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    falcon = FalconInference(str(falcon_dir), quantization_config=quant_config, trust_remote_code=True, seed=3)
    assert falcon.llm.loaded.spec.quantize == "nf4"
    prompt = "Description d'équipe: 3 à 4 intervenants"
    sequences = falcon(prompt, max_length=40, do_sample=True, top_k=10, num_return_sequences=2,
                       eos_token_id=falcon.tokenizer.eos_token_id)
    assert len(sequences) == 2 and all(seq["generated_text"].startswith(prompt) for seq in sequences)
    assert sequences[0]["generated_text"] != sequences[1]["generated_text"]
    (answer,) = falcon.generate(prompt, max_length=40, do_sample=False, return_full_text=False)
    assert answer and not answer.startswith(prompt)


@pytest.fixture()
def checkpoint_without_tokenizer(tiny_model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "out"
    target.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, target / name)
    return target


def test_generator_like_mini_llm(checkpoint_without_tokenizer, tiny_model_dir):
    from shardgen.compat import Generator

    gen = Generator(checkpoint_path=str(checkpoint_without_tokenizer), tokenizer_path=str(tiny_model_dir), device="cpu")
    output = gen.generate(prompt="Once upon a time", max_new_tokens=8, temperature=0.8, top_p=0.95, seed=4)
    assert output.startswith("Once upon a time") and len(output) > len("Once upon a time")
    assert gen.generate("Once upon a time", max_new_tokens=8, temperature=0.8, top_p=0.95, seed=4) == output
    outputs = gen.generate_batch(["Hello", "How are", "The cat"], batch_size=3, max_new_tokens=6)
    assert len(outputs) == 3 and outputs[2].startswith("The cat")
    streamed = "".join(gen.generate_stream("Once upon a time", max_new_tokens=8, temperature=0.8, top_p=0.95, seed=4))
    assert streamed and output.endswith(streamed)


def test_generator_refuses_a_raw_state_dict_with_what_would_work(tiny_model_dir, tmp_path):
    from shardgen.compat import Generator

    checkpoint = tmp_path / "out" / "ckpt.pt"
    checkpoint.parent.mkdir()
    torch.save({"model": {"tok_embeddings.weight": torch.zeros(4, 2)}, "model_args": {"dim": 2}}, checkpoint)
    with pytest.raises(ModelError) as info:
        Generator(checkpoint_path=str(checkpoint), tokenizer_path=str(tiny_model_dir), device="cpu")
    assert "raw PyTorch checkpoint" in str(info.value) and "save_pretrained" in str(info.value)


def seed_config(path: Path, data: Path, model: Path, output: Path, **extra: object) -> Path:
    """The suite's [inferencer] section, every key of its InferencerConfig, plus where the model is."""
    lines = [
        "[inferencer]",
        "max_sequence_length = 1024",
        'dtype = "null"',
        "load_in_4bit = false",
        "load_in_8bit = false",
        'testing_data_id = "${SG_TEST_SET}"',
        'question_column = "question"',
        'ground_truth_column = "answer"',
        'system_prompt_column = "system"',
        'system_prompt_override_text = "null"',
        "max_new_tokens = 6",
        "use_cache = true",
        "temperature = 0.0",
        "min_p = 0.1",
        'hf_user_id = "someone"',
        'run_name = "null"',
        'run_name_prefix = "run-"',
        'run_name_suffix = ""',
        f'model = "{model}"',
        f'output_file = "{output}"',
        *[f"{key} = {json.dumps(value)}" for key, value in extra.items()],
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_inferencer_runs_a_toml_config_and_writes_the_suite_rows(tiny_model_dir, tmp_path, monkeypatch):
    from shardgen.compat import ConfigManager, Inferencer
    from shardgen.workers import LLM

    data = write_jsonl(tmp_path / "test.jsonl", QUESTIONS)
    monkeypatch.setenv("SG_TEST_SET", str(data))
    output = tmp_path / "inferencer_output.jsonl"
    config_manager = ConfigManager(seed_config(tmp_path / "custom_config.toml", data, tiny_model_dir, output))
    inferencer = Inferencer(config_manager=config_manager)
    results = inferencer.run()
    print(f"Generated {len(results)} predictions")

    assert [json.loads(line) for line in output.read_text().splitlines()] == results
    assert [r["question"] for r in results] == [q["question"] for q in QUESTIONS]
    assert [r["ground_truth"] for r in results] == [q["answer"] for q in QUESTIONS]
    for row in results:
        assert set(row) == {"question", "predicted_answer", "ground_truth", "metadata"}
        assert set(row["metadata"]) == {"model_id", "inference_time", "token_count", "generation_config"}
        assert row["metadata"]["model_id"] == str(tiny_model_dir) and row["metadata"]["token_count"] > 0
        assert row["metadata"]["generation_config"]["max_new_tokens"] == 6
    direct = LLM(str(tiny_model_dir), device="cpu", system_prompt="Be brief.").generate(
        [q["question"] for q in QUESTIONS], max_new_tokens=6, temperature=0.0, min_p=0.1
    )
    assert [r["predicted_answer"] for r in results] == [c.text for c in direct]
    assert output.with_suffix(".parquet").is_file()  # the full shardgen result, kept for scoring


def test_inferencer_config_errors_are_one_line(tiny_model_dir, tmp_path, monkeypatch):
    from shardgen.compat import ConfigManager, Inferencer
    from shardgen.compat.inferencer import run_options

    with pytest.raises(InvalidParameter, match="does not exist"):
        ConfigManager(tmp_path / "missing.toml")
    (tmp_path / "other.toml").write_text("[fine_tuner]\nepochs = 1\n")
    with pytest.raises(InvalidParameter, match=r"has no \[inferencer\] section"):
        Inferencer(config_manager=ConfigManager(tmp_path / "other.toml"))
    with pytest.raises(InvalidParameter, match="names no model: set run_name"):
        run_options({"testing_data_id": "x.jsonl", "hf_user_id": "someone", "run_name": None}, "[inferencer]")
    assert run_options({"testing_data_id": "x.jsonl", "hf_user_id": "someone", "run_name": "qa-1"}, "s")["model"] == "someone/qa-1"
    with pytest.raises(InvalidParameter, match="unknown option 'temprature'"):
        run_options({"testing_data_id": "x.jsonl", "model": "m", "temprature": 0.5}, "[inferencer]")
