import json
import pytest

from shardgen.schemas.errors import InvalidParameter
from shardgen.workers.generation import FINISH_LENGTH


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    from shardgen.workers import LLM

    return LLM(str(tiny_model_dir), device="cpu", batch_size=4, max_new_tokens=6)


def test_generate_accepts_one_string_or_a_list_in_order(llm):
    (single,) = llm.generate("Hello there")
    many = llm.generate(["Hello there", "Something else entirely", "Hello there"])
    assert [c.text for c in many] == [single.text, many[1].text, single.text]
    assert single.generated_tokens == 6 and single.finish_reason == FINISH_LENGTH
    assert single.prompt_tokens > 3 and single.texts == [single.text]


def test_defaults_and_per_call_aliases(llm):
    (default,) = llm.generate("Hi")
    assert default.generated_tokens == 6
    (short,) = llm.generate("Hi", max_tokens=2)
    assert short.generated_tokens == 2
    (capped,) = llm.generate("Hi", max_length=default.prompt_tokens + 3)
    assert capped.generated_tokens == 3
    (several,) = llm.generate("Write a poem about rivers", num_return_sequences=3, do_sample=True, temperature=2.0, seed=5, top_k=50, top_p=0.95)
    assert len(several.texts) == 3 and len(set(several.texts)) > 1
    again = llm.generate("Write a poem about rivers", num_return_sequences=3, do_sample=True, temperature=2.0, seed=5, top_k=50, top_p=0.95)[0]
    assert again.texts == several.texts


def test_chat_takes_message_lists_and_matches_generate(llm):
    (from_chat,) = llm.chat([[{"role": "user", "content": "Hello there"}]])
    assert from_chat.text == llm.generate("Hello there")[0].text
    with_system = llm.chat([[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hello there"}]])[0]
    assert with_system.prompt_tokens != from_chat.prompt_tokens  # replaces the template's default system turn


VARIED = dict(temperature=1.5, seed=3, max_new_tokens=10)  # the tiny model's greedy text is all newlines


def test_stream_pieces_join_to_the_generated_text(llm):
    pieces = list(llm.stream("Hello there", **VARIED))
    assert len(pieces) > 3
    assert "".join(pieces) == llm.generate("Hello there", **VARIED)[0].text


def test_stream_holds_back_a_stop_string(llm):
    full = llm.generate("Hello there", **VARIED)[0].text
    stop = full[len(full) // 2 :][:4]
    pieces = list(llm.stream("Hello there", **VARIED, stop=[stop]))
    assert "".join(pieces) == full[: full.index(stop)]
    assert all(stop not in piece for piece in pieces)


def test_batch_size_auto_and_a_memory_budget_are_accepted_as_documented(tiny_model_dir):
    from shardgen.workers import LLM

    auto = LLM(str(tiny_model_dir), device="cpu", batch_size="auto", max_memory="64GiB", max_new_tokens=3)
    assert auto.runtime.batch_size == "auto" and auto.generator.auto_batch
    assert [c.generated_tokens for c in auto.generate(["Hi", "Hello there", "Hey"])] == [3, 3, 3]
    assert auto.generator.stats.slots == 3  # sized to what the call can fill, within the budget


@pytest.mark.parametrize(
    "params, message",
    [({"temperature": -1}, "temperature must be >= 0"), ({"top_p": 2}, "top_p"), ({"bogus": 1}, "unknown generation parameter")],
)
def test_invalid_parameters_raise(llm, params, message):
    with pytest.raises(InvalidParameter, match=message):
        llm.generate("Hi", **params)


def test_invalid_defaults_refused_before_loading():
    from shardgen.workers import LLM

    with pytest.raises(InvalidParameter, match="temperature"):
        LLM("/nonexistent/model", temperature=-1)


def test_too_long_prompt_reports_error(llm):
    (completion,) = llm.generate("word " * 600)
    assert completion.error and "context" in completion.error and completion.text == ""
    with pytest.raises(InvalidParameter, match="context"):
        list(llm.stream("word " * 600))


@pytest.mark.real_model
def test_real_model_knows_the_capital_of_france():
    from shardgen.workers import LLM

    llm = LLM(device="cpu", max_new_tokens=24)
    assert "Paris" in llm.chat([[{"role": "user", "content": "What is the capital of France?"}]])[0].text


def test_api_and_cli_give_the_same_sampled_text_for_the_same_seed(tmp_path, tiny_model_dir):
    from shardgen.producer.embedded import run_embedded
    from shardgen.schemas.runtime import RuntimeOptions
    from shardgen.schemas.model import ModelSpec
    from shardgen.schemas.run import RunSpec
    from shardgen.schemas.sampling import SamplingParams
    from shardgen.workers import LLM
    from tests.conftest import write_jsonl

    prompts = ["Tell me about rivers.", "And about stars?", "Bread, please."]
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts])
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=5)
    spec = RunSpec(input=str(data), model=ModelSpec(model=str(tiny_model_dir)), params=params)
    run_embedded(spec, tmp_path / "out.jsonl", RuntimeOptions(device="cpu"))
    cli_texts = [json.loads(line)["generation"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    api_texts = [c.text for c in LLM(str(tiny_model_dir), device="cpu").generate(prompts, **params.to_dict())]
    assert api_texts == cli_texts


# ---------------------------------------------------------------- names users bring from the replaced classes
def test_model_id_device_none_and_use_cache_are_accepted(tiny_model_dir, llm):
    from shardgen.workers import LLM
    from shardgen.workers.models.loader import check_device

    other = LLM(model_id=str(tiny_model_dir), device=None, use_cache=False, max_new_tokens=6)
    assert other.loaded.device == check_device("auto")
    assert other.generate("Hello there")[0].text == llm.generate("Hello there")[0].text  # the same tokens either way
    assert llm.generate("Hello there", use_cache=True)[0].text == llm.generate("Hello there")[0].text
    with pytest.raises(InvalidParameter, match="use_cache must be true or false"):
        llm.generate("Hello there", use_cache="yes")
    with pytest.raises(InvalidParameter, match="disagree"):
        LLM("one-model", model_id="another-model")


def test_quantization_config_takes_torch_dtypes_and_bitsandbytes_config_objects(tiny_model_dir):
    import torch
    from transformers import BitsAndBytesConfig

    from shardgen.workers import LLM
    from shardgen.workers.api import plain_quantization_config

    seed_config = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16}
    assert plain_quantization_config(seed_config)["bnb_4bit_compute_dtype"] == "bfloat16"
    as_object = plain_quantization_config(BitsAndBytesConfig(load_in_8bit=True))
    assert as_object["load_in_8bit"] is True and "quant_method" not in as_object
    quantized = LLM(str(tiny_model_dir), device="cpu", quantization_config=seed_config, max_new_tokens=3)
    assert quantized.loaded.spec.quantize == "nf4"
    assert quantized.loaded.spec.quantization_config["bnb_4bit_compute_dtype"] == "bfloat16"
    assert any("4bit" in type(m).__name__ for m in quantized.loaded.model.modules())
    assert quantized.generate("Hello there")[0].generated_tokens == 3


def test_max_length_that_leaves_no_room_is_an_error_not_an_empty_string(llm):
    (completion,) = llm.generate("Hello there", max_length=20)  # the chat template alone is longer than 20 tokens
    assert completion.prompt_tokens > 20 and completion.text == ""
    assert completion.error and "max_length=20 leaves no room to generate" in completion.error
    assert f"the prompt alone has {completion.prompt_tokens} tokens" in completion.error
    with pytest.raises(InvalidParameter, match="leaves no room"):
        list(llm.stream("Hello there", max_length=20))
    fine, short = llm.generate(["Hi", "Hello there"], max_length=completion.prompt_tokens)
    assert fine.generated_tokens > 0 and fine.error is None and short.error  # one prompt's problem stays its own


def test_the_engine_comes_from_the_environment_as_in_the_cli(tiny_model_dir, monkeypatch):
    from shardgen.schemas.runtime import ENVIRONMENT
    from shardgen.workers import LLM

    monkeypatch.setenv(ENVIRONMENT["engine"], "hf-generate")
    plain = LLM(str(tiny_model_dir), device="cpu", max_new_tokens=5, temperature=1.5, seed=2)
    text = plain.generate("Hello there")[0].text
    assert plain.last_path == "hf-generate"
    assert "".join(plain.stream("Hello there")) == text


# ---------------------------------------------------------------- prompts as the model expects them
@pytest.fixture(scope="module")
def base_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model as a base model: no chat template, and a tokenizer that puts BOS in front (as llama's)."""
    import shutil

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    target = tmp_path_factory.mktemp("base") / "model"
    shutil.copytree(tiny_model_dir, target)
    tokenizer = AutoTokenizer.from_pretrained(target)
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    tokenizer.chat_template = None
    (target / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(target)
    assert AutoTokenizer.from_pretrained(target).chat_template is None
    return target


def test_base_model_prompts_keep_their_bos(base_model_dir, llm):
    from shardgen.workers import LLM
    from tests.conftest import chat_ids

    base = LLM(str(base_model_dir), device="cpu", max_new_tokens=2)
    (completion,) = base.generate("Once upon a time")
    bos = base.tokenizer.bos_token_id
    assert completion.prompt_ids == base.tokenizer("Once upon a time")["input_ids"]
    assert completion.prompt_ids[0] == bos and completion.prompt_ids.count(bos) == 1
    (chat,) = llm.generate("Once upon a time")  # a chat template holds its own special tokens: none added twice
    assert chat.prompt_ids == chat_ids(llm.tokenizer, "Once upon a time")


def test_raw_pytorch_checkpoint_is_refused_with_what_would_work(tiny_model_dir, tmp_path):
    import torch

    from shardgen.schemas.errors import ModelError
    from shardgen.workers import LLM

    state = {"weight": torch.zeros(2, 2)}
    torch.save({"model": state, "model_args": {"dim": 2}}, tmp_path / "ckpt.pt")
    for target in (tmp_path / "ckpt.pt", tmp_path):
        with pytest.raises(ModelError) as info:
            LLM(str(target), device="cpu")
        line = str(info.value)
        assert "ckpt.pt is a raw PyTorch checkpoint with no transformers config" in line
        assert "save_pretrained" in line and ".gguf" in line and "\n" not in line
    weights = next(p for p in tiny_model_dir.iterdir() if p.suffix == ".safetensors")
    assert LLM(str(weights), device="cpu").loaded.source == str(tiny_model_dir)  # a file of a checkpoint: its directory
