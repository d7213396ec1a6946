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


def test_call_and_run_return_a_string(llm):
    assert llm("Hello there") == llm.generate("Hello there")[0].text
    assert llm.run("Hello there", max_length=200) == llm("Hello there", max_length=200)


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
        llm("word " * 600)


@pytest.mark.real_model
def test_real_model_knows_the_capital_of_france():
    from shardgen.workers import LLM

    llm = LLM(device="cpu", max_new_tokens=24)
    assert "Paris" in llm.chat([[{"role": "user", "content": "What is the capital of France?"}]])[0].text


def test_api_and_cli_give_the_same_sampled_text_for_the_same_seed(tmp_path, tiny_model_dir):
    from shardgen.producer.embedded import run_embedded
    from shardgen.schemas.model import ModelSpec
    from shardgen.schemas.run import RunSpec
    from shardgen.schemas.sampling import SamplingParams
    from shardgen.workers import LLM
    from tests.conftest import write_jsonl

    prompts = ["Tell me about rivers.", "And about stars?", "Bread, please."]
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in prompts])
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, seed=5)
    spec = RunSpec(input=str(data), model=ModelSpec(model=str(tiny_model_dir)), params=params)
    run_embedded(spec, tmp_path / "out.jsonl", device="cpu")
    cli_texts = [json.loads(line)["generation"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    api_texts = [c.text for c in LLM(str(tiny_model_dir), device="cpu").generate(prompts, **params.to_dict())]
    assert api_texts == cli_texts
