import dataclasses

import pytest

from shardgen.schemas.sampling import SamplingParams
from shardgen.workers.engine import PATH_BEAM_SEARCH, PATH_ENGINE, Engine
from shardgen.workers.generation import GenerationCancelled
from shardgen.workers.generation import FINISH_LENGTH, FINISH_STOP, GenerationRequest
from shardgen.workers.engine.hf_generate import HFGenerate
from tests.conftest import chat_ids

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "List three prime numbers.",
    "Who wrote Hamlet?",
    "Translate 'good morning' to Spanish.",
    "What is 12 times 7?",
    "Give me one tip for learning to program, and explain why it helps beginners most.",
    "Describe a cat in five words.",
    "Why is the sky blue?",
    "Name a famous painter and one of their works, then say briefly why that work matters in the history of art.",
    "What is the boiling point of water in Fahrenheit?",
    "Summarize the plot of Romeo and Juliet.",
    "Suggest a name for a bakery.",
    "How many legs does a spider have?",
    "Write one sentence about autumn leaves falling in a quiet park.",
]


def requests_for(tokenizer, count, seed_base=0):
    return [GenerationRequest(chat_ids(tokenizer, q), seed=seed_base + i) for i, q in enumerate(QUESTIONS[:count])]


def token_ids(outputs):
    return [[s.token_ids for s in o.samples] for o in outputs]


def test_greedy_matches_hf_generate_one_prompt_at_a_time(tiny_loaded, tiny_reference):
    requests = requests_for(tiny_loaded.tokenizer, 10)
    params = SamplingParams(max_new_tokens=12)
    engine = Engine(tiny_loaded, batch_size=3)
    expected = HFGenerate(tiny_reference, 1).generate(requests, params)
    assert token_ids(engine.generate(requests, params)) == token_ids(expected)
    assert engine.last_path == PATH_ENGINE


def test_per_row_seed_gives_same_text_whatever_the_batch(tiny_loaded):
    requests = requests_for(tiny_loaded.tokenizer, 8, seed_base=100)
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, n=2)
    together = Engine(tiny_loaded, batch_size=8).generate(requests, params)
    reversed_small = Engine(tiny_loaded, batch_size=2).generate(requests[::-1], params)[::-1]
    alone = [Engine(tiny_loaded, batch_size=2).generate([r], params)[0] for r in requests[:2]]
    assert token_ids(together) == token_ids(reversed_small)
    assert token_ids(together[:2]) == token_ids(alone)
    other_seed = Engine(tiny_loaded).generate([GenerationRequest(requests[0].prompt_ids, seed=999)], params)
    assert token_ids(other_seed) != token_ids(together[:1])


def test_n_samples_per_prompt_differ(tiny_loaded):
    requests = requests_for(tiny_loaded.tokenizer, 3)
    outputs = Engine(tiny_loaded, batch_size=4).generate(requests, SamplingParams(max_new_tokens=8, temperature=1.0, n=3))
    for output in outputs:
        assert len(output.samples) == 3
        assert len({tuple(s.token_ids) for s in output.samples}) > 1
        assert output.generated_tokens == 24


def test_max_new_tokens_and_max_length(tiny_loaded):
    request = requests_for(tiny_loaded.tokenizer, 1)[0]
    engine = Engine(tiny_loaded)
    (output,) = engine.generate([request], SamplingParams(max_new_tokens=5))
    assert len(output.samples[0].token_ids) == 5 and output.samples[0].finish_reason == FINISH_LENGTH
    (output,) = engine.generate([request], SamplingParams(max_length=len(request.prompt_ids) + 3))
    assert len(output.samples[0].token_ids) == 3


def test_stop_token_ids_and_stop_strings(tiny_loaded):
    request = requests_for(tiny_loaded.tokenizer, 1)[0]
    engine = Engine(tiny_loaded)
    free = engine.generate([request], SamplingParams(max_new_tokens=12))[0].samples[0]
    stop_id = free.token_ids[4]
    first = free.token_ids.index(stop_id)
    stopped = engine.generate([request], SamplingParams(max_new_tokens=12, stop_token_ids=[stop_id]))[0].samples[0]
    assert stopped.token_ids == free.token_ids[: first + 1] and stopped.finish_reason == FINISH_STOP

    stop_text = free.text[len(free.text) // 2 :][:3]
    cut = engine.generate([request], SamplingParams(max_new_tokens=12, stop=[stop_text]))[0].samples[0]
    assert cut.finish_reason == FINISH_STOP
    assert cut.text == free.text[: free.text.index(stop_text)]
    assert len(cut.token_ids) < len(free.token_ids)


def test_too_long_prompt_fails_alone(tiny_loaded):
    requests = requests_for(tiny_loaded.tokenizer, 2)
    too_long = GenerationRequest([42] * (tiny_loaded.context_length + 5), seed=0)
    outputs = Engine(tiny_loaded).generate([requests[0], too_long, requests[1]], SamplingParams(max_new_tokens=4))
    assert outputs[1].error.startswith(f"prompt has {tiny_loaded.context_length + 5} tokens; the model's context is")
    assert outputs[1].samples == []
    assert all(len(o.samples[0].token_ids) == 4 and o.error is None for o in (outputs[0], outputs[2]))


def test_on_output_once_per_request_and_slots_reused(tiny_loaded):
    requests = requests_for(tiny_loaded.tokenizer, 9)
    seen = []
    engine = Engine(tiny_loaded, batch_size=2)
    outputs = engine.generate(requests, SamplingParams(max_new_tokens=6), on_output=lambda i, o: seen.append((i, o)))
    assert sorted(i for i, _ in seen) == list(range(9))
    assert all(outputs[i] is o for i, o in seen)
    assert engine.cache.slots == 2


def test_eos_stops_unless_ignore_eos(tiny_loaded):
    request = requests_for(tiny_loaded.tokenizer, 1)[0]
    free = Engine(tiny_loaded).generate([request], SamplingParams(max_new_tokens=8))[0].samples[0]
    pretend_eos = free.token_ids[2]
    loaded = dataclasses.replace(tiny_loaded, eos_token_ids=(pretend_eos,))
    stopped = Engine(loaded).generate([request], SamplingParams(max_new_tokens=8))[0].samples[0]
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(pretend_eos) + 1]
    assert stopped.finish_reason == FINISH_STOP
    ignored = Engine(loaded).generate([request], SamplingParams(max_new_tokens=8, ignore_eos=True))[0].samples[0]
    assert ignored.token_ids == free.token_ids and ignored.finish_reason == FINISH_LENGTH


def test_no_kv_cache_mode_gives_same_greedy_tokens(tiny_loaded):
    requests = requests_for(tiny_loaded.tokenizer, 4)
    params = SamplingParams(max_new_tokens=6)
    cached = Engine(tiny_loaded, batch_size=2).generate(requests, params)
    recomputed = Engine(tiny_loaded, batch_size=2, use_kv_cache=False).generate(requests, params)
    assert token_ids(cached) == token_ids(recomputed)


def test_repetition_penalty_matches_hf_generate(tiny_loaded, tiny_reference):
    requests = requests_for(tiny_loaded.tokenizer, 3)
    params = SamplingParams(max_new_tokens=10, repetition_penalty=3.0)
    penalized = Engine(tiny_loaded, batch_size=2).generate(requests, params)
    assert token_ids(penalized) == token_ids(HFGenerate(tiny_reference, 1).generate(requests, params))
    assert token_ids(penalized) != token_ids(Engine(tiny_loaded).generate(requests, params.replace(repetition_penalty=1.0)))


def test_beam_search_goes_through_hf_generate(tiny_loaded):
    requests = requests_for(tiny_loaded.tokenizer, 2)
    engine = Engine(tiny_loaded)
    outputs = engine.generate(requests, SamplingParams(max_new_tokens=4, num_beams=2))
    assert engine.last_path == PATH_BEAM_SEARCH
    assert all(len(o.samples) == 1 for o in outputs)


def test_should_stop_cancels_between_steps(tiny_loaded):
    requests = requests_for(tiny_loaded.tokenizer, 4)
    finished = []
    with pytest.raises(GenerationCancelled):
        Engine(tiny_loaded, batch_size=1).generate(
            requests, SamplingParams(max_new_tokens=4), on_output=lambda i, o: finished.append(i), should_stop=lambda: len(finished) >= 2
        )
    assert len(finished) == 2


@pytest.mark.real_model
def test_real_model_greedy_matches_hf_generate_one_at_a_time(real_loaded):
    from shardgen.schemas.model import ModelSpec
    from shardgen.workers.models.loader import load_model

    requests = requests_for(real_loaded.tokenizer, 16)
    params = SamplingParams(max_new_tokens=24)
    engine = Engine(real_loaded, batch_size=8)
    assert engine.packing.replaced > 0, "the engine runs the packed weights and its own decode step here"
    plain = load_model(ModelSpec(), "cpu")  # the engine packed real_loaded's linears; the reference stays plain
    expected = HFGenerate(plain, 1).generate(requests, params)
    assert token_ids(engine.generate(requests, params)) == token_ids(expected)
