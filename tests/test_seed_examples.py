"""Every usage example of the five documents of the classes shardgen replaces, run as written.

Each test holds one document's code blocks, copied as they stand, with only these changes:
- the import line: `from shardgen.compat import ...` instead of finetuning_suite, zeta, app.* or inference.*;
- the model id or path: a tiny random model (tests/tiny_model.py) built here, instead of a hub id;
- files an example reads (a TOML config, a test set, "my_dataset") are written to a temporary directory first,
  which is then the working directory, as it would be for the user;
and then asserts on what the example returned or printed.

Where an example is not runnable anywhere as written, its test runs the nearest faithful reading and says so:
a fragment that uses names the document never defines, pseudo-code, or a call that no library accepts. Shell
blocks (pip install, git clone, the projects' own scripts) are not Python; their shardgen equivalents run.
The documents are 000 Inference, 001 GPTQInference, 002 the Falcon pipeline, 003 the Inferencer and 004
Mini-LLM's Generator (the seed documents of shardgen.compat).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import write_jsonl
from tests.tiny_architectures import build_architecture

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [
    {"question": "What is machine learning?", "answer": "ML is a method of data analysis", "system": "Be brief."},
    {"question": "What is the capital of France?", "answer": "Paris", "system": "Be brief."},
    {"question": "How many legs does a spider have?", "answer": "8", "system": "Be brief."},
]


@pytest.fixture(scope="module")
def one_thread():
    """`make test` runs two test processes on two cores: one torch thread each keeps them from contending."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's working directory, with shardgen's cache (calibrated GPTQ checkpoints) kept inside it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SHARDGEN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


# ---------------------------------------------------------------- 000: Inference
def test_000_inference_class_definition_matches_the_document():
    from shardgen.compat import Inference

    parameters = inspect.signature(Inference.__init__).parameters
    assert [(p, parameters[p].default) for p in ("device", "max_length", "quantize", "quantization_config")] == [
        ("device", None), ("max_length", 20), ("quantize", False), ("quantization_config", None)
    ]
    for method in (Inference.__call__, Inference.run):
        assert list(inspect.signature(method).parameters)[1:] == ["prompt_text", "max_length"]


def test_000_inference_example_1_basic_usage(tiny_model_dir, capsys):
    from shardgen.compat import Inference  # was: from finetuning_suite import Inference

    model_id = str(tiny_model_dir)  # was: "gpt2-small"
    inference = Inference(model_id=model_id)

    prompt_text = "Once upon a time"
    generated_text = inference(prompt_text)
    print(generated_text)

    assert isinstance(generated_text, str) and generated_text.startswith(prompt_text)
    assert len(generated_text) > len(prompt_text)
    assert capsys.readouterr().out == generated_text + "\n"


def test_000_inference_example_2_specifying_maximum_length(tiny_model_dir, capsys):
    from shardgen.compat import Inference  # was: from finetuning_suite import Inference

    model_id = str(tiny_model_dir)  # was: "gpt2-small"
    inference = Inference(model_id=model_id, max_length=50)

    prompt_text = "In a land far, far away"
    generated_text = inference.run(prompt_text, max_length=30)
    print(generated_text)

    assert generated_text.startswith(prompt_text) and len(generated_text) > len(prompt_text)
    assert inference.max_length == 50 and capsys.readouterr().out == generated_text + "\n"


def test_000_inference_example_3_using_quantization(tiny_model_dir, capsys):
    """As written the example imports Inference twice (from zeta, then from finetuning_suite), uses torch without
    importing it and model_id from the example before: one import of each, model_id as in example 1."""
    import torch

    from shardgen.compat import Inference  # was: from zeta import Inference / from finetuning_suite import Inference

    model_id = str(tiny_model_dir)
    quantization_config = {
        'load_in_4bit': True,
        'bnb_4bit_use_double_quant': True,
        'bnb_4bit_quant_type': "nf4",
        'bnb_4bit_compute_dtype': torch.bfloat16
    }
    inference = Inference(model_id=model_id, quantize=True, quantization_config=quantization_config)

    prompt_text = "Once upon a time"
    generated_text = inference(prompt_text)
    print(generated_text)

    assert generated_text.startswith(prompt_text) and len(generated_text) > len(prompt_text)
    spec = inference.llm.loaded.spec
    assert spec.quantize == "nf4" and spec.quantization_config["bnb_4bit_compute_dtype"] == "bfloat16"
    assert type(inference.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"


# ---------------------------------------------------------------- 001: GPTQInference
def _gptq_bits(engine) -> int:
    config = json.loads((Path(engine.llm.loaded.source) / "config.json").read_text())
    return config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"]


def test_001_gptq_class_definition_matches_the_document():
    from shardgen.compat import GPTQInference

    parameters = inspect.signature(GPTQInference.__init__).parameters
    assert [(p, parameters[p].default) for p in ("quantization_config_bits", "quantization_config_dataset", "max_length")] == [
        ("quantization_config_bits", 4), ("quantization_config_dataset", None), ("max_length", 500)
    ]
    assert list(inspect.signature(GPTQInference.generate).parameters) == ["self", "prompt"]


def test_001_gptq_example_1_basic_usage(tiny_model_dir, workdir, capsys):
    """No dataset: calibrated on the sample shipped with shardgen."""
    from shardgen.compat import GPTQInference  # was: from zeta import GPTQInference

    model_id = str(tiny_model_dir)  # was: "gpt2-medium"
    inference_engine = GPTQInference(model_id)
    output_text = inference_engine.generate("Once upon a time")
    print(output_text)

    assert output_text.startswith("Once upon a time") and len(output_text) > len("Once upon a time")
    assert capsys.readouterr().out == output_text + "\n"
    assert inference_engine.llm.loaded.info["checkpoint_quantization"] == "compressed-tensors" and _gptq_bits(inference_engine) == 4


def test_001_gptq_example_2_using_custom_quantization_bits(tiny_model_dir, workdir, capsys):
    from shardgen.compat import GPTQInference  # was: from zeta import GPTQInference

    model_id = str(tiny_model_dir)  # was: "gpt2-medium"
    inference_engine = GPTQInference(model_id, quantization_config_bits=2)
    output_text = inference_engine.generate("The future of AI is")
    print(output_text)

    assert output_text.startswith("The future of AI is") and len(output_text) > len("The future of AI is")
    assert capsys.readouterr().out == output_text + "\n"
    assert _gptq_bits(inference_engine) == 2  # test_quantization checks each width's weights on its grid


def test_001_gptq_example_3_specifying_a_dataset_for_quantization(tiny_model_dir, workdir, capsys):
    """"my_dataset" is a dataset saved with save_to_disk in the working directory."""
    import datasets

    texts = ["The river slowed as it reached the plain, and the farmers watched the water rise over the fields.",
             "Merchants carried salt, cloth and iron along the old road between the two market towns."]
    datasets.Dataset.from_list([{"text": texts[i % 2]} for i in range(8)]).save_to_disk("my_dataset")

    from shardgen.compat import GPTQInference  # was: from zeta import GPTQInference

    model_id = str(tiny_model_dir)  # was: "gpt2-medium"
    inference_engine = GPTQInference(model_id, quantization_config_dataset="my_dataset")
    output_text = inference_engine.generate("The beauty of nature is")
    print(output_text)

    assert output_text.startswith("The beauty of nature is") and len(output_text) > len("The beauty of nature is")
    assert capsys.readouterr().out == output_text + "\n"
    assert _gptq_bits(inference_engine) == 4
    assert inference_engine.llm.loaded.spec.quantization_config["dataset"] == "my_dataset"


# ---------------------------------------------------------------- 002: the Falcon pipeline
def test_002_falcon_prompt_function_drives_the_pipeline(tmp_path, capsys):
    """The document has no Python block: "The `prompt` function allows you to input your query, and the model will
    generate corresponding text", "customized by adjusting parameters like max_length, top_k, and
    num_return_sequences", on falcon-7b-instruct loaded in 4 bits with BitsAndBytes. Its reading: the notebook
    the document describes (its query, its BitsAndBytesConfig, its printing loop), through FalconInference.prompt.
    The shell blocks (pip install, git clone) are not Python."""
    from transformers import BitsAndBytesConfig

    from shardgen.compat import FalconInference

    model = str(build_architecture("falcon-7b-layout", tmp_path / "falcon"))  # was: "tiiuae/falcon-7b-instruct"
    quant_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
    )
    falcon = FalconInference(model, quantization_config=quant_config)
    query = "J'ai besoin d'une équipe de 3 à 4 intervenants pour une mission banque pour le développement d'une digital factory"

    sequences = falcon.prompt(query)
    for seq in sequences:
        print(f"Result: {seq['generated_text']}")

    assert len(sequences) == 1 and sequences[0]["generated_text"].startswith(query)
    assert capsys.readouterr().out == f"Result: {sequences[0]['generated_text']}\n"
    assert falcon.llm.loaded.spec.quantize == "nf4"

    sequences = falcon.prompt(query, max_length=80, top_k=10, num_return_sequences=2)
    assert len(sequences) == 2 and all(seq["generated_text"].startswith(query) for seq in sequences)


# ---------------------------------------------------------------- 003: the Inferencer
def inferencer_config(path: Path, model_dir: Path, **values: object) -> Path:
    """The suite's config file: its [inferencer] section with every InferencerConfig key. The model is the suite's
    own hf_user_id/run_name, pointed at the tiny model's directory."""
    section = {
        "max_sequence_length": 1024,
        "dtype": "null",
        "load_in_4bit": False,
        "load_in_8bit": False,
        "testing_data_id": "test.jsonl",
        "question_column": "question",
        "ground_truth_column": "answer",
        "system_prompt_column": "system",
        "system_prompt_override_text": "null",
        "max_new_tokens": 8,
        "use_cache": True,
        "temperature": 0.0,
        "min_p": 0.1,
        "hf_user_id": str(model_dir.parent),
        "run_name": model_dir.name,
        "run_name_prefix": "",
        "run_name_suffix": "",
        **values,
    }
    path.write_text("[inferencer]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in section.items()))
    return path


@pytest.fixture()
def suite(workdir: Path, tiny_model_dir: Path) -> Path:
    """A working directory with the suite's config.toml and its test set."""
    write_jsonl(workdir / "test.jsonl", QUESTIONS)
    inferencer_config(workdir / "config.toml", tiny_model_dir)
    return workdir


def _suite_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_003_inferencer_basic_usage(suite, capsys):
    from shardgen.compat import Inferencer  # was: from app.inferencer import Inferencer

    # Initialize with default configuration
    inferencer = Inferencer()

    # Run inference on test dataset
    results = inferencer.run()
    print(f"Generated {len(results)} predictions")

    assert capsys.readouterr().out.endswith("Generated 3 predictions\n")
    assert _suite_rows(suite / "inferencer_output.jsonl") == results  # the Output Format section's file
    assert [r["question"] for r in results] == [q["question"] for q in QUESTIONS]
    assert [r["ground_truth"] for r in results] == [q["answer"] for q in QUESTIONS]
    for row in results:
        assert set(row) == {"question", "predicted_answer", "ground_truth", "metadata"}
        assert set(row["metadata"]) == {"model_id", "inference_time", "token_count", "generation_config"}
        assert isinstance(row["predicted_answer"], str) and row["metadata"]["token_count"] > 0


def test_003_inferencer_custom_configuration(suite, tiny_model_dir):
    inferencer_config(suite / "custom_config.toml", tiny_model_dir, max_new_tokens=3, output_file="custom.jsonl")

    from shardgen.compat import ConfigManager  # was: from app.config_manager import ConfigManager
    from shardgen.compat import Inferencer  # was: from app.inferencer import Inferencer

    # Load custom configuration
    config_manager = ConfigManager("custom_config.toml")
    inferencer = Inferencer(config_manager=config_manager)

    # Run inference
    results = inferencer.run()

    assert len(results) == 3 and _suite_rows(suite / "custom.jsonl") == results
    assert all(0 < r["metadata"]["token_count"] <= 3 for r in results)


def test_003_inferencer_command_line_usage(suite, monkeypatch):
    """`uv run app/inferencer.py --hf-key "your_token"` runs the suite's own script; shardgen's command line reads
    the same config.toml: `shardgen run --config config.toml -o inferencer_output.jsonl --hf-token your_token`
    (or HF_TOKEN from the environment)."""
    from click.testing import CliRunner

    from shardgen.producer.cli import cli

    monkeypatch.setenv("HF_TOKEN", "your_token")
    result = CliRunner().invoke(cli, ["run", "--config", "config.toml", "-o", "inferencer_output.jsonl", "--score"])
    assert result.exit_code == 0, result.output
    rows = _suite_rows(suite / "inferencer_output.jsonl")
    assert [(r["question"], r["ground_truth"]) for r in rows] == [(q["question"], q["answer"]) for q in QUESTIONS]
    assert all(isinstance(r["generation"], str) and set(r["score"]) >= {"exact_match", "token_f1"} for r in rows)


def test_003_inferencer_core_methods(suite):
    """The Core Methods section's three calls; `dataset` is the test set, loaded with datasets."""
    import datasets
    from transformers import PreTrainedModel

    from shardgen.compat import Inferencer

    inferencer = Inferencer()
    dataset = datasets.load_dataset("json", data_files="test.jsonl", split="train")

    model, tokenizer = inferencer.load_model_and_tokenizer()
    assert isinstance(model, PreTrainedModel) and tokenizer("hello").input_ids

    processed_data = inferencer.process_dataset(dataset)
    assert len(processed_data) == 3 and all(isinstance(p, str) for p in processed_data)
    for prompt, row in zip(processed_data, QUESTIONS):
        assert row["system"] in prompt and row["question"] in prompt and prompt.endswith("<|im_start|>assistant\n")

    responses = inferencer.generate_responses(processed_data)
    assert len(responses) == 3 and all(isinstance(r, str) and r for r in responses)
    assert responses == [r["predicted_answer"] for r in inferencer.run()]  # the same answers as run()


def test_003_inferencer_model_loading_and_quantization_settings(suite, tiny_model_dir):
    """Automatic Model Discovery: `model_path = f"{config.hf_user_id}/{run_name}"` uses names the document never
    defines; read as the Inferencer's config. "If run_name is None, it searches for the most recent model" on the
    hub, which shardgen does not do (a directory of checkpoints, whose latest is used, is its counterpart).
    Quantization Support and Memory Management assign config values: they are set in config.toml."""
    from shardgen.compat import ConfigManager, Inferencer
    from shardgen.schemas.errors import InvalidParameter

    inferencer = Inferencer()
    config, run_name = inferencer.config, inferencer.config.run_name
    model_path = f"{config.hf_user_id}/{run_name}"
    assert model_path == str(tiny_model_dir) and inferencer.run_spec().model.model == model_path

    checkpoints = suite / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "checkpoint-100").symlink_to(tiny_model_dir, target_is_directory=True)
    latest = Inferencer(config_manager=ConfigManager(inferencer_config(suite / "latest.toml", tiny_model_dir,
                                                                        run_name="null", model=str(checkpoints))))
    assert latest.load_model_and_tokenizer()[0] is not None
    with pytest.raises(InvalidParameter, match="names no model: set run_name"):
        Inferencer(config_manager=ConfigManager(inferencer_config(suite / "none.toml", tiny_model_dir, run_name="null")))

    # 4-bit quantization (most memory efficient)
    load_in_4bit = True
    four = Inferencer(config_manager=ConfigManager(inferencer_config(suite / "4bit.toml", tiny_model_dir, load_in_4bit=load_in_4bit)))
    assert four.run_spec().model.quantize == "nf4"
    assert type(four.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert all(isinstance(r, str) for r in four.generate_responses(four.process_dataset(QUESTIONS)))

    # 8-bit quantization (balanced)
    load_in_8bit = True
    eight = Inferencer(config_manager=ConfigManager(inferencer_config(suite / "8bit.toml", tiny_model_dir, load_in_8bit=load_in_8bit)))
    assert eight.run_spec().model.quantize == "int8"

    # Full precision (highest quality)
    load_in_4bit = False
    load_in_8bit = False
    full = Inferencer(config_manager=ConfigManager(inferencer_config(
        suite / "full.toml", tiny_model_dir, load_in_4bit=load_in_4bit, load_in_8bit=load_in_8bit)))
    assert full.run_spec().model.quantize == "none"

    # Memory optimization strategies
    use_cache = True           # Enable KV caching
    max_sequence_length = 2048 # Limit context length
    batch_size = 1            # Process one sample at a time
    memory = Inferencer(config_manager=ConfigManager(inferencer_config(
        suite / "memory.toml", tiny_model_dir, use_cache=use_cache, max_sequence_length=max_sequence_length, batch_size=batch_size)))
    assert memory.run_spec().max_prompt_tokens == 2048 and memory.batch_size == 1
    assert memory.generate_responses(memory.process_dataset(QUESTIONS)) == Inferencer().generate_responses(QUESTIONS)


def test_003_inferencer_generation_parameters(suite):
    """Generation Parameters and Performance Optimization list config values: each dict is taken as the
    [inferencer] keys it names (the suite reads them from config.toml); `config` in the memory dict is the same."""
    from shardgen.compat import Inferencer

    inferencer = Inferencer()
    generation_config = {
        "max_new_tokens": 512,     # Maximum response length
        "temperature": 0.7,        # Randomness (0.0-1.0)
        "do_sample": True,         # Enable sampling
        "use_cache": True          # Use key-value caching
    }
    vars(inferencer.config).update(generation_config)
    params = inferencer.run_spec().params
    assert (params.max_new_tokens, params.temperature) == (512, 0.7)

    generation_config = {
        "top_p": 0.9,             # Nucleus sampling
        "top_k": 50,              # Top-k sampling
        "min_p": 0.1,             # Min-p sampling
        "repetition_penalty": 1.1, # Avoid repetition
        "length_penalty": 1.0,     # Length preference
        "early_stopping": True     # Stop at EOS token
    }
    vars(inferencer.config).update(generation_config)
    params = inferencer.run_spec().params
    assert (params.top_p, params.top_k, params.min_p, params.repetition_penalty, params.early_stopping) == (0.9, 50, 0.1, 1.1, True)

    # For low-memory systems
    config = {
        "load_in_4bit": True,
        "max_sequence_length": 1024,
        "batch_size": 1,
        "use_cache": True
    }
    low_memory = Inferencer()
    vars(low_memory.config).update(config)
    assert low_memory.run_spec().model.quantize == "nf4" and low_memory.run_spec().max_prompt_tokens == 1024

    # For faster inference
    config = {
        "use_cache": True,
        "max_new_tokens": 256,
        "temperature": 0.0,  # Deterministic
        "do_sample": False   # Greedy decoding
    }
    fast = Inferencer()
    vars(fast.config).update(config)
    answers = fast.generate_responses(fast.process_dataset(QUESTIONS[:1]))
    assert len(answers) == 1 and answers == fast.generate_responses(fast.process_dataset(QUESTIONS[:1]))  # greedy

    # For better responses
    config = {
        "temperature": 0.7,
        "top_p": 0.9,
        "repetition_penalty": 1.1,
        "max_new_tokens": 512
    }
    quality = Inferencer()
    vars(quality.config).update(config)
    assert (quality.run_spec().params.temperature, quality.run_spec().params.top_p) == (0.7, 0.9)


def test_003_inferencer_data_processing(suite, tiny_model_dir):
    """Input Format, Column Mapping (set in config.toml, on a test set with those columns) and Chat Template
    Application (its `tokenizer`, `system_prompt` and `question` are the Inferencer's and the first row's)."""
    from shardgen.compat import ConfigManager, Inferencer

    row = {
        "question": "What is machine learning?",
        "answer": "Expected response (optional)",
        "system": "System prompt (optional)"
    }
    inferencer = Inferencer()
    assert len(inferencer.process_dataset([row])) == 1

    # Map your dataset columns
    question_column = "input"        # Your question column
    ground_truth_column = "output"   # Your answer column
    system_prompt_column = "system"  # Your system prompt column
    write_jsonl(suite / "mapped.jsonl", [{"input": q["question"], "output": q["answer"], "system": q["system"]} for q in QUESTIONS])
    mapped = Inferencer(config_manager=ConfigManager(inferencer_config(
        suite / "mapped.toml", tiny_model_dir, testing_data_id="mapped.jsonl", question_column=question_column,
        ground_truth_column=ground_truth_column, system_prompt_column=system_prompt_column)))
    results = mapped.run()
    assert [(r["question"], r["ground_truth"]) for r in results] == [(q["question"], q["answer"]) for q in QUESTIONS]

    tokenizer, system_prompt, question = inferencer.tokenizer, row["system"], row["question"]
    # Automatic template application
    formatted_prompt = tokenizer.apply_chat_template(
        conversation=[
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": question}
        ],
        tokenize=False
    )
    (processed,) = inferencer.process_dataset([row])
    assert processed == formatted_prompt + "<|im_start|>assistant\n"  # and the generation prompt


def test_003_inferencer_batch_processing(suite):
    """As written the loop is pseudo-code: the test set has no input_ids column, and generate takes a tensor,
    not a list of lists. Its reading: each batch of rows processed and answered by the Inferencer."""
    import datasets

    from shardgen.compat import Inferencer

    inferencer = Inferencer()
    dataset = datasets.load_dataset("json", data_files="test.jsonl", split="train")
    batch_size = 2

    answers = []
    # Process multiple samples
    for batch in dataset.batch(batch_size):
        responses = inferencer.generate_responses(inferencer.process_dataset(batch))
        # Save batch results
        answers.extend(responses)

    assert answers == inferencer.generate_responses(inferencer.process_dataset(dataset))


def test_003_inferencer_model_loading_errors(suite, tiny_model_dir, monkeypatch, capsys):
    """The block as written, three times: with the model, without it, and with loading out of memory."""
    from shardgen.compat import ConfigManager, Inferencer, ModelNotFoundError, OutOfMemoryError
    from shardgen.workers.models import loader

    def load(inferencer):
        try:
            model, tokenizer = inferencer.load_model_and_tokenizer()
        except ModelNotFoundError:
            print("Model not found. Check model path and authentication.")
        except OutOfMemoryError:
            print("Insufficient memory. Try quantization or smaller model.")
        else:
            return model, tokenizer

    model, tokenizer = load(Inferencer())
    assert model is not None and tokenizer is not None and capsys.readouterr().out == ""

    assert load(Inferencer(config_manager=ConfigManager(inferencer_config(
        suite / "missing.toml", tiny_model_dir, run_name="no-such-run")))) is None
    assert capsys.readouterr().out == "Model not found. Check model path and authentication.\n"

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(loader, "load_model", out_of_memory)
    assert load(Inferencer()) is None
    assert capsys.readouterr().out == "Insufficient memory. Try quantization or smaller model.\n"


def test_003_inferencer_generation_errors(suite):
    """The block as written (`config` is the Inferencer's), with generation running out of memory at any batch
    size once; the settings it lowers then hold for the retry."""
    from shardgen.compat import Inferencer
    from shardgen.workers.generation import EngineOOM

    inferencer = Inferencer()
    data = inferencer.process_dataset(QUESTIONS)
    expected = inferencer.generate_responses(data)
    config = inferencer.config
    engine = inferencer._engine()
    real_generate = engine.generate
    engine.generate = lambda *args, **kwargs: (_ for _ in ()).throw(EngineOOM("out of memory at batch size 1"))

    responses = None
    try:
        responses = inferencer.generate_responses(data)
    except RuntimeError as e:
        if "out of memory" in str(e):
            # Reduce batch size or sequence length
            config.max_sequence_length = 1024
            config.batch_size = 1

    assert responses is None and (inferencer.batch_size, inferencer.run_spec().max_prompt_tokens) == (1, 1024)
    engine.generate = real_generate
    assert inferencer.generate_responses(data) == expected


def test_003_inferencer_with_the_evaluator(suite):
    """With Fine-Tuner: shardgen does not train (FineTune is not provided); the inference half runs as written."""
    from shardgen.compat import Evaluator, Inferencer
    from shardgen.producer.score import METRICS, read_results, score_rows

    # Use the trained model for inference
    inferencer = Inferencer()
    results = inferencer.run()
    assert len(results) == 3

    # Inference provides data for evaluation
    inferencer = Inferencer()
    predictions = inferencer.run()

    # Evaluate the predictions
    evaluator = Evaluator()
    scores = evaluator.run()

    assert len(predictions) == 3 and set(scores) == set(METRICS)
    assert all(value is None or 0.0 <= value <= 1.0 for value in scores.values())
    rows, _ = read_results("inferencer_output.jsonl")
    assert scores == score_rows(rows)[1].means  # shardgen score's metrics on the same file
    assert json.loads((suite / "evaluator_output_summary.json").read_text())["means"] == scores


def test_003_inferencer_advanced_usage(suite, tiny_model_dir):
    """Custom Generation Loop runs as written (its config samples: temperature 0.7, as its do_sample=True needs).
    Streaming Inference is not runnable anywhere: transformers' generate takes no `stream` argument. Its reading
    is the Inferencer's stream_inference, the answer to one prompt in pieces as they are generated."""
    from shardgen.compat import ConfigManager, Inferencer

    class CustomInferencer(Inferencer):
        def custom_generate(self, prompt):
            # Custom generation logic
            inputs = self.tokenizer(prompt, return_tensors="pt")

            with torch.no_grad():
                outputs = self.model.generate(
                    **inputs,
                    max_new_tokens=self.config.max_new_tokens,
                    temperature=self.config.temperature,
                    do_sample=True
                )

            response = self.tokenizer.decode(outputs[0], skip_special_tokens=True)
            return response

    custom = CustomInferencer(config_manager=ConfigManager(inferencer_config(suite / "sampled.toml", tiny_model_dir,
                                                                              temperature=0.7)))
    response = custom.custom_generate("What is machine learning?")
    assert response.startswith("What is machine learning?") and len(response) > len("What is machine learning?")

    inferencer = Inferencer()
    prompt = inferencer.process_dataset(QUESTIONS[:1])[0]
    pieces = list(inferencer.stream_inference(prompt))
    assert pieces and "".join(pieces) == inferencer.generate_responses([prompt])[0]


# ---------------------------------------------------------------- 004: Mini-LLM's Generator
def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def test_004_generator_basic_generation(tiny_model_dir, capsys):
    """checkpoint_path: a save_pretrained directory (a raw torch.save state dict such as out/ckpt.pt has no
    architecture to build; it is refused in one line). device="cuda" where there is a GPU, else the CPU."""
    from shardgen.compat import Generator  # was: from inference.generate import Generator

    # Load model
    gen = Generator(
        checkpoint_path=str(tiny_model_dir),  # was: "out/ckpt.pt"
        tokenizer_path=str(tiny_model_dir),  # was: "Tokenizer/BPE"
        device=_device(),  # was: "cuda"
    )

    # Generate text
    output = gen.generate(
        prompt="Once upon a time",
        max_new_tokens=50,
        temperature=0.8,
        top_p=0.95
    )

    print(output)

    assert output.startswith("Once upon a time") and len(output) > len("Once upon a time")
    assert capsys.readouterr().out == output + "\n"


def test_004_generator_streaming_and_batch_generation(tiny_model_dir, capsys):
    """Streaming Output uses `generate_stream`, `tokenizer` and `prompt` undefined in the document: the
    Generator's. Early Stopping is a fragment of the original's own loop (shardgen's engine stops at EOS itself);
    the command line (`python inference/generate.py`) is Mini-LLM's script."""
    from shardgen.compat import Generator

    gen = Generator(checkpoint_path=str(tiny_model_dir), tokenizer_path=str(tiny_model_dir), device=_device())
    generate_stream, tokenizer, prompt = gen.generate_stream, gen.tokenizer, "Hello world"

    for token in generate_stream(prompt):
        print(tokenizer.decode([token]), end='', flush=True)

    streamed = capsys.readouterr().out
    assert streamed and isinstance(streamed, str)

    prompts = ["Hello", "How are", "The cat"]
    outputs = gen.generate_batch(prompts, batch_size=3)

    assert len(outputs) == 3 and all(output.startswith(p) for output, p in zip(outputs, prompts))
