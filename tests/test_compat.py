"""shardgen.compat: code written for the classes shardgen replaces runs with only its import line changed.

Each test is the seed document's own usage, pointed at a tiny random model instead of a hub id."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from shardgen.schemas.errors import InputError, InvalidParameter, ModelError
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

    # A GPTQ checkpoint loads as it is: the bits are its own, and it is not calibrated again. (Without a dataset,
    # see test_seed_examples: the sample shipped with shardgen calibrates it.)
    checkpoint = inference_engine.llm.loaded.source
    again = GPTQInference(checkpoint, quantization_config_bits=8, max_length=12)
    assert again.llm.loaded.source == checkpoint
    assert list((tmp_path / "cache" / "models").glob("gptq-*")) == [Path(checkpoint)]
    with pytest.raises(ModelError, match="already quantized \\(compressed-tensors\\); GPTQ calibration fields do not apply"):
        GPTQInference(checkpoint, quantization_config_dataset=str(dataset))


@pytest.mark.parametrize("bits", [1, 5, 16, "4"])
def test_gptq_inference_refuses_bits_it_cannot_make_before_loading(bits):
    from shardgen.compat import GPTQInference

    with pytest.raises(InvalidParameter) as info:
        GPTQInference("/no/such/model", quantization_config_bits=bits)
    assert info.value.line() == f"quantization_config_bits must be one of 2, 3, 4, 8, got {bits!r}"


def test_gptq_inference_of_a_model_nowhere_to_be_found_is_model_not_found():
    from shardgen.compat import GPTQInference, ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="someone/no-such-model"):  # off the hub, or the hub out of reach
        GPTQInference("someone/no-such-model")


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


def test_falcon_prompt_is_the_documents_pipeline_function(falcon_dir):
    from shardgen.compat import FalconInference

    falcon = FalconInference(str(falcon_dir), max_length=30, seed=5)
    query = "J'ai besoin d'une équipe de 3 à 4 intervenants"
    (sequence,) = falcon.prompt(query)  # the constructor's max_length, top_k and num_return_sequences
    assert sequence["generated_text"].startswith(query) and len(sequence["generated_text"]) > len(query)
    assert falcon.prompt(query) == falcon(query)  # same seed, same pipeline call
    sequences = falcon.prompt(query, max_length=24, top_k=5, num_return_sequences=3)
    assert len(sequences) == 3 and all(s["generated_text"].startswith(query) for s in sequences)
    with pytest.raises(InvalidParameter, match="max_length=3 leaves no room to generate"):
        falcon.prompt(query, max_length=3)  # max_length reaches the pipeline
    with pytest.raises(InvalidParameter, match="query must be a non-empty string"):
        falcon.prompt("  ")


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
    tokens = list(gen.generate_stream("Once upon a time", max_new_tokens=8, temperature=0.8, top_p=0.95, seed=4))
    assert tokens and all(isinstance(t, int) for t in tokens)  # token ids, printed with tokenizer.decode([token])
    prompt_ids = gen.tokenizer("Once upon a time").input_ids
    assert gen.tokenizer.decode(prompt_ids + tokens, skip_special_tokens=True) == output  # what generate returned


def test_generator_refuses_a_raw_state_dict_with_what_would_work(tiny_model_dir, tmp_path):
    from shardgen.compat import Generator

    checkpoint = tmp_path / "out" / "ckpt.pt"
    checkpoint.parent.mkdir()
    torch.save({"model": {"tok_embeddings.weight": torch.zeros(4, 2)}, "model_args": {"dim": 2}}, checkpoint)
    with pytest.raises(ModelError) as info:
        Generator(checkpoint_path=str(checkpoint), tokenizer_path=str(tiny_model_dir), device="cpu")
    assert "raw PyTorch checkpoint" in str(info.value) and "save_pretrained" in str(info.value)


def seed_config(path: Path, data: Path, model: Path | str, output: Path, **overrides: object) -> Path:
    """The suite's [inferencer] section, every key of its InferencerConfig, plus where the model is; `overrides`
    replace or add keys."""
    values: dict[str, object] = {
        "max_sequence_length": 1024,
        "dtype": "null",
        "load_in_4bit": False,
        "load_in_8bit": False,
        "testing_data_id": "${SG_TEST_SET}",
        "question_column": "question",
        "ground_truth_column": "answer",
        "system_prompt_column": "system",
        "system_prompt_override_text": "null",
        "max_new_tokens": 6,
        "use_cache": True,
        "temperature": 0.0,
        "min_p": 0.1,
        "hf_user_id": "someone",
        "run_name": "null",
        "run_name_prefix": "run-",
        "run_name_suffix": "",
        "model": str(model),
        "output_file": str(output),
    }
    values.update(overrides)
    path.write_text("[inferencer]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
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


@pytest.fixture()
def inferencer_factory(tiny_model_dir, tmp_path, monkeypatch):
    """An Inferencer on the tiny model and QUESTIONS, its [inferencer] keys overridable."""
    from shardgen.compat import ConfigManager, Inferencer

    data = write_jsonl(tmp_path / "test.jsonl", QUESTIONS)
    monkeypatch.setenv("SG_TEST_SET", str(data))

    def make(**overrides: object) -> Inferencer:
        model = overrides.pop("model", tiny_model_dir)
        path = seed_config(tmp_path / "config.toml", data, model, tmp_path / "inferencer_output.jsonl", **overrides)
        return Inferencer(config_manager=ConfigManager(path))

    return make


def _templated(tokenizer, system: str, question: str) -> str:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_inferencer_process_dataset_maps_columns_applies_system_prompt_and_template(inferencer_factory):
    import datasets

    rows = [{"input": q["question"], "output": q["answer"], "sys": f"Be brief, {i}."} for i, q in enumerate(QUESTIONS)]
    inferencer = inferencer_factory(question_column="input", ground_truth_column="output", system_prompt_column="sys")
    processed = inferencer.process_dataset(datasets.Dataset.from_list(rows))
    expected = [_templated(inferencer.tokenizer, r["sys"], r["input"]) for r in rows]
    assert processed == expected
    assert inferencer.process_dataset(rows) == expected  # a list of rows
    assert inferencer.process_dataset(datasets.Dataset.from_list(rows)[:2]) == expected[:2]  # a batch of columns

    override = inferencer_factory(question_column="input", system_prompt_override_text="Answer in French.")
    assert override.process_dataset(rows)[0] == _templated(override.tokenizer, "Answer in French.", rows[0]["input"])


def test_inferencer_process_dataset_refuses_rows_it_cannot_map_in_one_line(inferencer_factory):
    import datasets

    inferencer = inferencer_factory(question_column="input")
    with pytest.raises(InputError) as info:
        inferencer.process_dataset([{"question": "Why?", "system": "x"}])
    assert info.value.message.startswith("column 'input' (question_column in [inferencer] in ")
    assert info.value.hint == "available columns: question, system"
    with pytest.raises(InputError, match="row 1 of the dataset: prompt column 'input' is empty in this row"):
        inferencer.process_dataset([{"input": "Why?", "system": "x"}, {"input": " ", "system": "x"}])
    with pytest.raises(InputError, match="process_dataset takes one split of a dataset"):
        inferencer.process_dataset(datasets.DatasetDict({"test": datasets.Dataset.from_list(QUESTIONS)}))
    with pytest.raises(InputError, match="takes a datasets.Dataset, a list of rows .* got str"):
        inferencer.process_dataset("test.jsonl")


def test_inferencer_generate_responses_answers_in_order_as_run_does(inferencer_factory, tiny_model_dir):
    from shardgen.workers import LLM

    inferencer = inferencer_factory()
    processed = inferencer.process_dataset(QUESTIONS)
    responses = inferencer.generate_responses(processed)
    assert responses == [row["predicted_answer"] for row in inferencer.run()]
    assert inferencer.generate_responses(QUESTIONS) == responses  # rows are processed first
    assert "".join(inferencer.stream_inference(processed[1])) == responses[1]

    inferencer.config.max_new_tokens = 2  # a change to the config applies to the next call
    direct = LLM(str(tiny_model_dir), device="cpu", system_prompt="Be brief.").generate(
        [q["question"] for q in QUESTIONS], max_new_tokens=2, temperature=0.0, min_p=0.1
    )
    assert inferencer.generate_responses(processed) == [c.text for c in direct]


def test_inferencer_halves_the_batch_out_of_memory_and_raises_out_of_memory_at_one_row(inferencer_factory):
    from shardgen.compat import OutOfMemoryError
    from shardgen.schemas.errors import ShardgenError
    from shardgen.workers.generation import EngineOOM

    inferencer = inferencer_factory(batch_size=4)
    processed = inferencer.process_dataset(QUESTIONS)
    expected = inferencer.generate_responses(processed)
    engine = inferencer._engine()
    real_generate, sizes = engine.generate, []

    def short_of_memory(requests, params, **kwargs):
        sizes.append(engine.batch_size)
        if engine.batch_size > 1:
            raise EngineOOM(f"out of memory at batch size {engine.batch_size}")
        return real_generate(requests, params, **kwargs)

    engine.generate = short_of_memory
    assert inferencer.generate_responses(processed) == expected
    assert sizes == [4, 2, 1] and engine.batch_size == 4

    engine.generate = lambda requests, params, **kwargs: (_ for _ in ()).throw(EngineOOM("out of memory at batch size 1"))
    with pytest.raises(OutOfMemoryError) as info:
        inferencer.generate_responses(processed)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ShardgenError)
    assert "out of memory" in str(info.value) and "max_sequence_length" in info.value.hint


def test_inferencer_generate_responses_names_a_prompt_it_cannot_answer(inferencer_factory):
    inferencer = inferencer_factory(max_sequence_length="null")  # no cut: the prompt outgrows the 512-token context
    too_long = [QUESTIONS[0], {**QUESTIONS[1], "question": "why " * 600}]
    with pytest.raises(InputError, match="prompt 1 could not be answered: prompt has 6.. tokens; the model's context"):
        inferencer.generate_responses(too_long)
    assert len(inferencer_factory(max_sequence_length=64).generate_responses(too_long)) == 2  # cut from the left


class _Letters:
    """A tokenizer whose token i is the i-th character of `text` (the stream helpers only decode)."""

    def __init__(self, text: str):
        self.text = text

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.text[i] for i in ids)


def test_stream_text_sends_only_settled_text_and_stops_before_a_stop_string():
    from shardgen.workers.streaming import text_stream as stream_text

    letters = _Letters("Hello STOP world")
    pieces = list(stream_text(letters, range(len(letters.text)), stop=["STOP"]))
    assert "".join(pieces) == "Hello " and all("S" not in piece for piece in pieces)
    assert list(stream_text(letters, range(5))) == list("Hello")  # no stop strings: every token at once

    class HalfCharacters:
        """A byte tokenizer: token i is the i-th byte of "café", so "é" spans tokens 3 and 4 and the first alone
        decodes as U+FFFD."""

        def decode(self, ids, skip_special_tokens=True):
            return bytes("café".encode()[i] for i in ids).decode("utf-8", errors="replace")

    assert list(stream_text(HalfCharacters(), range(5))) == ["c", "a", "f", "é"]  # never the half character


def test_stream_token_ids_refuses_what_cannot_stream(tiny_loaded):
    from shardgen.schemas.sampling import SamplingParams
    from shardgen.workers.engine import Engine
    from shardgen.workers.generation import GenerationRequest
    from shardgen.workers.streaming import token_stream

    with pytest.raises(InvalidParameter, match="streaming makes one sample, got n=2"):
        next(token_stream(None, GenerationRequest([1, 2]), SamplingParams(n=2)))
    with pytest.raises(InvalidParameter, match="max_length=2 leaves no room to generate"):
        next(token_stream(Engine(tiny_loaded), GenerationRequest([1, 2]), SamplingParams(max_length=2)))


def test_inferencer_load_errors_are_the_ones_the_suite_catches(inferencer_factory, tmp_path, monkeypatch):
    from shardgen.compat import ModelNotFoundError, OutOfMemoryError
    from shardgen.workers.models import loader

    assert issubclass(ModelNotFoundError, ModelError)
    with pytest.raises(ModelNotFoundError, match="is neither a known alias, an existing directory nor a hub id"):
        inferencer_factory(model=str(tmp_path / "no-such-checkpoint")).load_model_and_tokenizer()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="holds no checkpoint"):
        inferencer_factory(model=str(tmp_path / "empty")).load_model_and_tokenizer()

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loader, "load_model", out_of_memory)
    with pytest.raises(OutOfMemoryError, match="ran out of memory \\(CUDA out of memory. Tried to allocate") as info:
        inferencer_factory().load_model_and_tokenizer()
    assert "load_in_4bit = true" in info.value.hint


def test_inferencer_config_holds_the_section_as_attributes(inferencer_factory):
    inferencer = inferencer_factory(batch_size=3)
    assert (inferencer.config.max_new_tokens, inferencer.config.temperature, inferencer.config.run_name) == (6, 0.0, None)
    assert inferencer.batch_size == 3
    inferencer.config.batch_size = 0
    with pytest.raises(InvalidParameter, match="batch_size in \\[inferencer\\] in .* must be a positive integer, got 0"):
        assert inferencer.batch_size


EVALUATED = [
    {"question": "Capital of France?", "predicted_answer": "Paris", "ground_truth": "Paris", "metadata": {}},
    {"question": "Spider legs?", "predicted_answer": "The answer is 8 legs", "ground_truth": "8", "metadata": {}},
    {"question": "A color?", "predicted_answer": "", "ground_truth": "red", "metadata": {"error": "boom"}},
    {"question": "Anything?", "predicted_answer": "yes", "ground_truth": None, "metadata": {}},
]


def test_evaluator_scores_the_inferencer_output_with_shardgen_score_metrics(tmp_path, monkeypatch):
    from shardgen.compat import Evaluator

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "inferencer_output.jsonl", EVALUATED)
    scores = Evaluator().run()
    assert scores == pytest.approx({"exact_match": 1 / 3, "normalized_exact_match": 1 / 3, "contains": 2 / 3,
                                    "token_f1": (1 + 0.4) / 3, "numeric_match": 1.0})
    summary = json.loads((tmp_path / "evaluator_output_summary.json").read_text())
    assert (summary["rows"], summary["scored"], summary["failed"], summary["counts"]["numeric_match"]) == (4, 3, 1, 1)
    detailed = [json.loads(line) for line in (tmp_path / "evaluator_output_detailed.jsonl").read_text().splitlines()]
    assert [row["score"] and row["score"]["exact_match"] for row in detailed] == [1.0, 0.0, 0.0, None]
    assert detailed[2]["metadata"] == {"error": "boom"} and "error" not in detailed[2]


def test_evaluator_reads_the_config_and_refuses_what_it_cannot_score(tmp_path, monkeypatch):
    from shardgen.compat import Evaluator

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "answers.jsonl", EVALUATED)
    config = tmp_path / "config.toml"
    config.write_text('[inferencer]\noutput_file = "answers.jsonl"\n[evaluator]\nmetrics = ["exact_match", "contains"]\n')
    assert Evaluator().run() == pytest.approx({"exact_match": 1 / 3, "contains": 2 / 3})
    config.write_text('[evaluator]\nmetrics = ["bleu_score", "rouge_score"]\n')
    with pytest.raises(InvalidParameter, match="unknown metric bleu_score, rouge_score: use one or more of exact_match"):
        Evaluator()
    config.unlink()
    with pytest.raises(InputError, match="inferencer_output.jsonl does not exist: run Inferencer\\(\\).run\\(\\) first"):
        Evaluator().run()
    write_jsonl(tmp_path / "inferencer_output.jsonl", [{**row, "ground_truth": None} for row in EVALUATED])
    with pytest.raises(InputError, match="none of the 4 rows .* has a ground truth to score against: set ground_truth_column"):
        Evaluator().run()
