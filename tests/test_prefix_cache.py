"""The prefix cache: shared prompt blocks are prefilled once, and the tokens are those of prefilling from scratch."""

from __future__ import annotations

import pytest

from shardgen.schemas.sampling import SamplingParams
from shardgen.workers.engine import Engine
from shardgen.workers.engine.prefix_cache import PrefixCache
from shardgen.workers.engine.memory import CacheLayout
from shardgen.workers.generation import GenerationRequest
from shardgen.workers.generators.hf_generate import HFGenerate
from tests.test_engine import QUESTIONS

INSTRUCTIONS = (
    "You are a careful assistant for a school quiz. Read the question, think about what is asked, and answer in "
    "one short sentence with no preamble. If the question asks for a list, give the items separated by commas."
)


def shared_prefix_requests(tokenizer, count: int, seed_base: int = 0) -> list[GenerationRequest]:
    """Chat prompts that share a system prompt of about 50 tokens (three blocks and more)."""
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": question}],
            tokenize=False, add_generation_prompt=True,
        )
        for question in QUESTIONS[:count]
    ]
    return [GenerationRequest(tokenizer(text, add_special_tokens=False)["input_ids"], seed=seed_base + i)
            for i, text in enumerate(prompts)]


def token_ids(outputs):
    return [[s.token_ids for s in o.samples] for o in outputs]


@pytest.mark.parametrize("batch_size, step_tokens", [(4, 512), (16, 512), (3, 20), (1, 512)])
def test_shared_prefixes_are_prefilled_once_and_give_the_tokens_of_a_prefill_from_scratch(
    tiny_loaded, tiny_reference, batch_size, step_tokens
):
    requests = shared_prefix_requests(tiny_loaded.tokenizer, 10)
    params = SamplingParams(max_new_tokens=12)
    expected = HFGenerate(tiny_reference, 1).generate(requests, params)
    engine = Engine(tiny_loaded, batch_size=batch_size, step_tokens=step_tokens)
    outputs = engine.generate(requests, params)
    assert token_ids(outputs) == token_ids(expected)
    shared_blocks = _shared_tokens(requests) // 16
    assert engine.stats.reused_prefix_tokens == (len(requests) - 1) * shared_blocks * 16
    assert engine.stats.prefill_tokens == sum(len(r.prompt_ids) for r in requests) - engine.stats.reused_prefix_tokens


def test_without_the_cache_every_prompt_is_prefilled_whole(tiny_loaded):
    requests = shared_prefix_requests(tiny_loaded.tokenizer, 6)
    params = SamplingParams(max_new_tokens=8)
    cached = Engine(tiny_loaded, batch_size=4)
    plain = Engine(tiny_loaded, batch_size=4, prefix_cache=False)
    assert token_ids(cached.generate(requests, params)) == token_ids(plain.generate(requests, params))
    assert plain.stats.reused_prefix_tokens == 0
    assert plain.stats.prefill_tokens == sum(len(r.prompt_ids) for r in requests)


def test_stored_prefixes_serve_the_next_call_and_sampled_tokens_do_not_change(tiny_loaded):
    """Kept across calls (the shards of a run); with n samples and a seed per row the text is the same."""
    requests = shared_prefix_requests(tiny_loaded.tokenizer, 8)
    params = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, n=2)
    plain = Engine(tiny_loaded, batch_size=6, prefix_cache=False).generate(requests[4:], params)
    engine = Engine(tiny_loaded, batch_size=6)
    engine.generate(requests[:4], params)
    before = engine.stats.copy()
    second = engine.generate(requests[4:], params)
    assert token_ids(second) == token_ids(plain)
    shared_blocks = _shared_tokens(requests) // 16
    assert engine.stats.since(before).reused_prefix_tokens == 4 * shared_blocks * 16


def test_a_prompt_that_is_all_prefix_still_computes_its_last_token(tiny_loaded, tiny_reference):
    ids = shared_prefix_requests(tiny_loaded.tokenizer, 1)[0].prompt_ids[:32]
    requests = [GenerationRequest(ids), GenerationRequest(ids), GenerationRequest(ids + ids[:16])]
    params = SamplingParams(max_new_tokens=6)
    engine = Engine(tiny_loaded, batch_size=3)
    assert token_ids(engine.generate(requests, params)) == token_ids(HFGenerate(tiny_reference, 1).generate(requests, params))
    assert engine.stats.reused_prefix_tokens == 16 + 32  # one block of the 32-token prompt, two of the longer one


def test_unshared_prompts_store_nothing(tiny_loaded):
    engine = Engine(tiny_loaded, batch_size=4)
    prompts = [[(7 * i + j) % 500 + 10 for j in range(40)] for i in range(6)]
    engine.generate([GenerationRequest(p) for p in prompts], SamplingParams(max_new_tokens=4))
    assert engine.prefixes is not None and engine.prefixes.nbytes == 0
    assert engine.stats.reused_prefix_tokens == 0


def test_a_full_pool_evicts_the_least_recently_used_blocks_that_nothing_continues():
    import torch

    layout = CacheLayout(layers=1, kv_heads=1, head_dim=2, dtype=torch.float32)
    prefixes = PrefixCache(layout, "cpu", block_tokens=2, max_bytes=3 * layout.slot_bytes(2))

    class Row:  # the two tensors a SlotCache gives the store: [layers, slots, kv_heads, capacity, head_dim]
        key_store = torch.arange(16.0).view(1, 1, 1, 8, 2)
        value_store = -key_store

    def keep(prompt):
        hashes = prefixes.prefix_hashes(prompt)
        prefixes.sighted(hashes)
        prefixes.sighted(hashes)
        return prefixes.store(Row, 0, prompt, hashes)

    assert keep([1, 2, 3, 4, 5, 6, 0]) == 3
    assert keep([1, 2, 9, 9, 0]) == 1  # evicts [5, 6]: the least recently used block nothing continues
    assert prefixes.lookup([1, 2, 3, 4, 5, 6, 0]).count == 2
    assert prefixes.lookup([1, 2, 9, 9, 0]).count == 2
    target = type("Target", (), {"key_store": torch.zeros(1, 1, 1, 8, 2), "value_store": torch.zeros(1, 1, 1, 8, 2)})
    assert prefixes.copy_into(target, 0, prefixes.lookup([1, 2, 3, 4, 0])) == 4
    assert torch.equal(target.key_store[..., :4, :], Row.key_store[..., :4, :])
    assert torch.equal(target.value_store[..., :4, :], Row.value_store[..., :4, :])


def _shared_tokens(requests: list[GenerationRequest]) -> int:
    first = requests[0].prompt_ids
    shared = min(len(r.prompt_ids) for r in requests)
    for r in requests[1:]:
        shared = min(shared, next((i for i, (a, b) in enumerate(zip(first, r.prompt_ids)) if a != b), shared))
    return shared
