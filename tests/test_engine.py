import dataclasses

import pytest
import torch

from shardgen.schemas.errors import InvalidParameter
from shardgen.schemas.sampling import SamplingParams
from shardgen.workers.engine import PATH_BEAM_SEARCH, PATH_ENGINE, Engine, NewToken
from shardgen.workers.generators.hf_generate import HFGenerate
from shardgen.workers.engine.memory import CacheLayout, fit_batch_size, parse_memory_size
from shardgen.workers.generation import (
    FINISH_LENGTH,
    FINISH_STOP,
    EngineOOM,
    GenerationCancelled,
    GenerationRequest,
    prompt_too_long,
)
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


@pytest.mark.parametrize("batch_size, step_tokens", [(3, 512), (3, 7), (16, 20), (1, 5)])
def test_greedy_matches_hf_generate_one_prompt_at_a_time(tiny_loaded, tiny_reference, batch_size, step_tokens):
    """Whatever the batch and however prompts are cut into chunks and packed beside decoding slots."""
    requests = requests_for(tiny_loaded.tokenizer, 10)
    params = SamplingParams(max_new_tokens=12)
    engine = Engine(tiny_loaded, batch_size=batch_size, step_tokens=step_tokens)
    expected = HFGenerate(tiny_reference, 1).generate(requests, params)
    assert token_ids(engine.generate(requests, params)) == token_ids(expected)
    assert engine.last_path == PATH_ENGINE


def test_waiting_prompts_prefill_together_in_one_forward(tiny_loaded):
    requests = requests_for(tiny_loaded.tokenizer, 6)
    # without the prefix cache, which would let the prompts behind the first wait for its system prompt's blocks
    engine = Engine(tiny_loaded, batch_size=8, step_tokens=512, prefix_cache=False)
    outputs = engine.generate(requests, SamplingParams(max_new_tokens=1))
    assert all(len(o.samples[0].token_ids) == 1 for o in outputs)
    assert engine.stats.forwards == 1  # six prompts, one forward, each prompt's first token from its own logits
    assert engine.stats.prefill_tokens == sum(len(r.prompt_ids) for r in requests)


def test_a_long_prompt_prefills_in_chunks_while_the_others_keep_decoding(tiny_loaded):
    short, long = requests_for(tiny_loaded.tokenizer, 1)[0], GenerationRequest(list(range(300, 500)), seed=1)
    engine = Engine(tiny_loaded, batch_size=2, step_tokens=16)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    order = [(e.index, e.token_id) for e in engine.events([short, long], params) if isinstance(e, NewToken)]
    before_long = [index for index, _ in order[: order.index(next(t for t in order if t[0] == 1))]]
    assert before_long == [0] * len(before_long) and len(before_long) >= 10  # 200 tokens in chunks of about 15
    # Only the short prompt's own prefill (37 tokens, 3 steps) ran without decoding; the long prompt's 200 tokens
    # all rode along in decode steps.
    assert engine.stats.forwards == engine.stats.decode_steps + 3


def test_stats_count_prefill_decode_and_occupancy(tiny_loaded):
    requests = requests_for(tiny_loaded.tokenizer, 5)
    engine = Engine(tiny_loaded, batch_size=4, prefix_cache=False)  # its counts: tests/test_prefix_cache.py
    outputs = engine.generate(requests, SamplingParams(max_new_tokens=6, n=2, temperature=1.0))
    stats = engine.stats
    assert stats.prefill_tokens == sum(len(r.prompt_ids) for r in requests)  # once per prompt, not per sample
    first_tokens = 5 * 2  # each sample's first token comes from its prompt's prefill
    assert stats.decode_tokens == sum(o.generated_tokens for o in outputs) - first_tokens
    assert stats.slots == 4 and stats.slot_steps == 4 * stats.decode_steps
    assert 0 < stats.batch_occupancy <= 1
    earlier = stats.copy()
    engine.generate(requests[:1], SamplingParams(max_new_tokens=3))
    assert engine.stats.since(earlier).prefill_tokens == len(requests[0].prompt_ids)


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


@pytest.mark.parametrize("generator", [Engine, HFGenerate])
def test_too_long_prompt_fails_alone_with_the_one_context_message(tiny_loaded, generator):
    requests = requests_for(tiny_loaded.tokenizer, 2)
    too_long = GenerationRequest([42] * (tiny_loaded.context_length + 5), seed=0)
    outputs = generator(tiny_loaded).generate([requests[0], too_long, requests[1]], SamplingParams(max_new_tokens=4))
    assert outputs[1].error == prompt_too_long(tiny_loaded.context_length + 5, tiny_loaded.context_length)
    assert outputs[1].error.startswith(f"prompt has {tiny_loaded.context_length + 5} tokens; the model's context is")
    assert outputs[1].samples == []
    assert all(len(o.samples[0].token_ids) == 4 and o.error is None for o in (outputs[0], outputs[2]))


def test_prompt_too_long_only_when_no_room_is_left():
    assert prompt_too_long(511, 512) is None
    assert "512 tokens" in prompt_too_long(512, 512) and "--max-prompt-tokens" in prompt_too_long(600, 512)


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


def test_the_kv_cache_gives_the_tokens_of_recomputing_every_sequence(tiny_loaded, tiny_reference):
    """use_cache is accepted and has no effect because the cache changes nothing but the time taken."""
    requests = requests_for(tiny_loaded.tokenizer, 4)
    params = SamplingParams(max_new_tokens=6)
    cached = Engine(tiny_loaded, batch_size=2).generate(requests, params)
    recomputed = HFGenerate(tiny_reference, 1, use_cache=False).generate(requests, params)
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


def test_should_stop_ends_a_beam_search_inside_its_batch(tiny_loaded):
    """The transformers path (beam search, Mistral, Gemma2) honours should_stop at its next step, not at the end
    of the batch: a cancel or a shutdown's grace does not wait for the whole generation."""
    requests = requests_for(tiny_loaded.tokenizer, 2)
    asked = []

    def should_stop():
        asked.append(1)
        return len(asked) > 3  # the first checks pass, then stop
    with pytest.raises(GenerationCancelled):
        Engine(tiny_loaded).generate(requests, SamplingParams(max_new_tokens=200, num_beams=2, ignore_eos=True),
                                     should_stop=should_stop)
    assert 3 < len(asked) < 20, "stopped within a few steps of being asked, not after 200"


class CountingTokenizer:
    """A tokenizer that counts the token ids it is asked to decode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, tokens, **kwargs):
        self.decoded += len(tokens)
        return self.tokenizer.decode(tokens, **kwargs)


@pytest.mark.parametrize("text", ["Hello, world! The capital of France is Paris.", "naïve café — 東京 😀 end"])
def test_incremental_text_is_the_whole_decode_and_decodes_each_token_a_bounded_number_of_times(real_loaded, text):
    from shardgen.workers.engine.stop import IncrementalText, StopScanner

    tokenizer = CountingTokenizer(real_loaded.tokenizer)
    ids = real_loaded.tokenizer(text * 8, add_special_tokens=False)["input_ids"]
    incremental = IncrementalText(tokenizer)
    for token in ids:
        incremental.add(token)
    assert incremental.text == real_loaded.tokenizer.decode(ids, skip_special_tokens=True)
    assert tokenizer.decoded < 8 * len(ids), "decoding the whole text each step would cost len(ids)**2 / 2"
    scanner = StopScanner(real_loaded.tokenizer, ["Paris.", "東京"])
    hits = [scanner.add(token) for token in ids]
    assert hits.index(True) == next(i for i in range(len(ids)) if any(
        s in real_loaded.tokenizer.decode(ids[: i + 1]) for s in ("Paris.", "東京")))


@pytest.mark.real_model
def test_real_model_greedy_matches_hf_generate_one_at_a_time(real_loaded):
    from shardgen.schemas.model import ModelSpec
    from shardgen.workers.models.loader import load_model

    requests = requests_for(real_loaded.tokenizer, 16)
    params = SamplingParams(max_new_tokens=24)
    # prompts in chunks, beside decoding slots; float32 weights, as the reference (auto may pick bfloat16)
    engine = Engine(real_loaded, batch_size=8, step_tokens=64, weights="float32")
    assert engine.packing.replaced > 0, "the engine runs the packed weights and its own step here"
    plain = load_model(ModelSpec(), "cpu")  # the engine packed real_loaded's linears; the reference stays plain
    expected = HFGenerate(plain, 1).generate(requests, params)
    assert token_ids(engine.generate(requests, params)) == token_ids(expected)
    assert engine.stats.forwards < engine.stats.decode_steps + 16  # some prompts prefilled beside decoding


def test_batch_size_auto_fills_the_memory_budget_up_to_what_the_call_needs(tiny_loaded):
    requests = requests_for(tiny_loaded.tokenizer, 9)
    engine = Engine(tiny_loaded, batch_size="auto", max_memory="64GiB")
    outputs = engine.generate(requests, SamplingParams(max_new_tokens=4))
    assert all(len(o.samples[0].token_ids) == 4 for o in outputs)
    assert engine.auto_batch and engine.batch_size == engine.stats.slots == 9  # room for more; 9 are all it can fill
    engine.batch_size = 4  # what halving after running out of memory does: fixed from then on
    engine.generate(requests, SamplingParams(max_new_tokens=4))
    assert not engine.auto_batch and engine.stats.slots == 4


def test_batch_size_auto_refuses_a_budget_without_room_for_one_slot(tiny_loaded):
    engine = Engine(tiny_loaded, batch_size="auto", max_memory="100MiB")  # less than the process already holds
    with pytest.raises(EngineOOM, match="raise --max-memory"):
        engine.generate(requests_for(tiny_loaded.tokenizer, 2), SamplingParams(max_new_tokens=4))


@pytest.mark.parametrize("bad", [0, -3, "many", 2.5])
def test_batch_size_must_be_positive_or_auto(tiny_loaded, bad):
    with pytest.raises(InvalidParameter, match="batch_size"):
        Engine(tiny_loaded, batch_size=bad)


def test_fit_batch_size_divides_what_the_budget_leaves_by_a_slot():
    gib, mib = 2**30, 2**20
    # 8 GiB budget, 1 GiB in use, 256 MiB reserve: 6.75 GiB left, 100 MiB a slot -> 69 slots
    assert fit_batch_size(8 * gib, 1 * gib, 100 * mib, reserve_bytes=256 * mib) == 69
    assert fit_batch_size(8 * gib, 1 * gib, 1 * mib, reserve_bytes=256 * mib, limit=256) == 256
    assert fit_batch_size(2 * gib, 1900 * mib, 100 * mib, reserve_bytes=0) == 1
    assert fit_batch_size(2 * gib, 2000 * mib, 100 * mib, reserve_bytes=0) == 0


def test_a_slot_costs_keys_and_values_of_every_layer():
    # the default model: 30 layers, 3 kv heads of 64, float32; 680 positions (a 550-token prompt and 130 new)
    layout = CacheLayout(layers=30, kv_heads=3, head_dim=64, dtype=torch.float32)
    assert layout.slot_bytes(680) == 30 * 2 * 3 * 680 * 64 * 4 == 31_334_400
    assert layout.cache_bytes(16, 680) == 16 * 31_334_400
    assert CacheLayout(30, 3, 64, torch.bfloat16).slot_bytes(680) == 31_334_400 // 2


@pytest.mark.parametrize("text, expected", [("8GiB", 8 * 2**30), ("6GB", 6 * 10**9), ("512M", 512 * 2**20),
                                            ("0.5g", 2**29), ("1000", 1000), (4096, 4096)])
def test_parse_memory_size(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "8 parsecs", "0", "-1GiB", ""])
def test_parse_memory_size_refuses_what_is_not_a_size(text):
    with pytest.raises(InvalidParameter, match="max_memory must be"):
        parse_memory_size(text)


def _forward_logprobs(loaded, prompt_ids, tokens):
    """log_softmax of transformers' forward logits at the positions that chose `tokens`."""
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([prompt_ids + tokens[:-1]])).logits[0]  # [L + T - 1, V]
    return logits[len(prompt_ids) - 1 :].log_softmax(dim=-1)  # [T, V]


def test_greedy_logprobs_are_the_models_log_softmax_and_the_chosen_token_tops_them(tiny_loaded, tiny_reference):
    requests = requests_for(tiny_loaded.tokenizer, 4)
    outputs = Engine(tiny_loaded, batch_size=4).generate(requests, SamplingParams(max_new_tokens=8, logprobs=5))
    for request, output in zip(requests, outputs):
        sample = output.samples[0]
        assert len(sample.logprobs) == len(sample.token_ids) == 8
        expected = _forward_logprobs(tiny_reference, request.prompt_ids, sample.token_ids)
        for step, entry in enumerate(sample.logprobs):
            assert entry.token_id == sample.token_ids[step]
            assert entry.logprob == pytest.approx(expected[step, entry.token_id].item(), abs=1e-4)
            top = expected[step].topk(5)
            assert list(entry.top_token_ids) == top.indices.tolist()
            assert entry.top_logprobs == pytest.approx(top.values.tolist(), abs=1e-4)
            assert entry.top_token_ids[0] == entry.token_id  # greedy: the argmax is the top alternative


def test_logprobs_are_raw_for_sampled_tokens_and_do_not_depend_on_the_batch(tiny_loaded, tiny_reference):
    requests = requests_for(tiny_loaded.tokenizer, 6, seed_base=10)
    params = SamplingParams(max_new_tokens=6, temperature=0.7, top_p=0.9, logprobs=3)
    together = Engine(tiny_loaded, batch_size=6).generate(requests, params)
    alone = Engine(tiny_loaded, batch_size=1, step_tokens=8).generate(requests, params)
    assert token_ids(together) == token_ids(alone)
    for a, b in zip(together, alone):
        for x, y in zip(a.samples[0].logprobs, b.samples[0].logprobs):
            assert x.top_token_ids == y.top_token_ids
            assert x.logprob == pytest.approx(y.logprob, abs=1e-5)
    sample = together[0].samples[0]
    expected = _forward_logprobs(tiny_reference, requests[0].prompt_ids, sample.token_ids)
    untempered = [expected[i, t].item() for i, t in enumerate(sample.token_ids)]
    assert [e.logprob for e in sample.logprobs] == pytest.approx(untempered, abs=1e-4)


def test_hf_generate_reports_the_same_logprobs(tiny_loaded, tiny_reference):
    requests = requests_for(tiny_loaded.tokenizer, 3)
    params = SamplingParams(max_new_tokens=6, logprobs=2)
    engine = Engine(tiny_loaded, batch_size=3).generate(requests, params)
    hf = HFGenerate(tiny_reference, 1).generate(requests, params)
    for a, b in zip(engine, hf):
        assert [e.top_token_ids for e in a.samples[0].logprobs] == [e.top_token_ids for e in b.samples[0].logprobs]
        assert [e.logprob for e in a.samples[0].logprobs] == pytest.approx([e.logprob for e in b.samples[0].logprobs], abs=1e-4)


def test_logprobs_off_or_zero(tiny_loaded):
    request = requests_for(tiny_loaded.tokenizer, 1)
    engine = Engine(tiny_loaded)
    assert engine.generate(request, SamplingParams(max_new_tokens=3))[0].samples[0].logprobs is None
    entries = engine.generate(request, SamplingParams(max_new_tokens=3, logprobs=0))[0].samples[0].logprobs
    assert len(entries) == 3 and all(e.top_token_ids == () and e.logprob <= 0 for e in entries)


def test_refill_joins_a_running_call_and_changes_no_token(tiny_loaded):
    """A worker's next shard joins the call while its slots free: each request's tokens are those it gets alone
    (greedy and sampled, per-row seeds), and the joined requests continue the call's indices."""
    first, later = requests_for(tiny_loaded.tokenizer, 6), requests_for(tiny_loaded.tokenizer, 16, seed_base=100)[6:]
    for params in (SamplingParams(max_new_tokens=10), SamplingParams(max_new_tokens=10, temperature=0.9, seed=3)):
        engine = Engine(tiny_loaded, batch_size=4)
        offered: list[list[GenerationRequest]] = [later[:5], later[5:]]
        taken: list[GenerationRequest] = []
        asked = []

        def refill(fits):
            asked.append(len(taken))
            joining = [r for r in offered.pop(0) if fits(r)] if offered else []
            taken.extend(joining)
            return joining

        seen = {}
        outputs = engine.generate(first, params, on_output=lambda i, out: seen.setdefault(i, out), refill=refill)
        assert len(taken) >= 5 and len(outputs) == len(first) + len(taken) == len(seen)
        assert token_ids(outputs) == token_ids(Engine(tiny_loaded, batch_size=4).generate(first + taken, params))
        assert not offered and len(asked) >= 3  # asked while it ran, and once more after both were taken


def test_refill_leaves_out_what_does_not_fit_the_running_call(tiny_loaded):
    engine = Engine(tiny_loaded, batch_size=2)
    short = requests_for(tiny_loaded.tokenizer, 2)
    too_long = GenerationRequest(short[0].prompt_ids * 4, seed=1)
    penalised = GenerationRequest(short[0].prompt_ids, params=SamplingParams(max_new_tokens=4, repetition_penalty=1.3))
    verdicts = []

    def refill(fits):
        if not verdicts:
            verdicts.extend([fits(too_long), fits(penalised), fits(short[1])])
        return []

    engine.generate(short, SamplingParams(max_new_tokens=4), refill=refill)
    assert verdicts == [False, False, True]
