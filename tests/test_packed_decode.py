"""The engine's fast path: packed linear layers, step planning, and its own forward step for llama-family models."""

import shutil
from pathlib import Path

import pytest
import torch

from shardgen.workers.engine import Engine
from shardgen.workers.engine.kv_cache import SlotCache
from shardgen.workers.engine.llama_step import DecoderParts, forward_step, unsupported_reason
from shardgen.workers.engine.packed_linear import PackedLinear, pack_linears
from shardgen.workers.engine.step_plan import (
    AttentionGroup,
    DecodeToken,
    PrefillChunk,
    attention_groups,
    decode_groups,
    plan_step,
    split_prefill,
)
from tests.conftest import run_in_fresh_process


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [0, 1, 5, 16, 17, 40, 119])
def test_packed_linear_computes_what_linear_computes(rows, bias):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(48, 80, bias=bias)
    packed = PackedLinear(linear, block_rows=16)
    x = torch.randn(rows, 3, 48)  # any leading shape
    with torch.no_grad():
        assert packed(x).shape == (rows, 3, 80)
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)


def test_packed_linear_multiplies_at_most_block_rows_at_a_time(monkeypatch):
    packed = PackedLinear(torch.nn.Linear(8, 4), block_rows=16)
    seen = []
    multiply = packed._multiply
    monkeypatch.setattr(packed, "_multiply", lambda rows: seen.append(rows.shape[0]) or multiply(rows))
    packed(torch.randn(40, 8))
    assert seen == [16, 16, 8]


@pytest.mark.parametrize("features", [(576, 1536), (1536, 576), (576, 192)])  # the default model's shapes
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(features):
    """So a token's logits are the same whatever shares its step (one row alone has a kernel of its own)."""
    torch.manual_seed(0)
    packed = PackedLinear(torch.nn.Linear(*features, bias=False))
    x = torch.randn(37, features[0])
    with torch.no_grad():
        together = packed(x)
        for row in (0, 3, 16, 36):
            assert torch.equal(packed(x[row : row + 1])[0], together[row])
            assert torch.equal(packed(x[row : row + 5])[0], together[row])


def test_pack_linears_replaces_plain_float_linears_once_and_counts_a_tied_head():
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(50, 8)
    model.proj = torch.nn.Linear(8, 8)
    model.head = torch.nn.Linear(8, 50, bias=False)
    model.head.weight = model.embed.weight  # tied, as in most small chat models

    class QuantizedLinear(torch.nn.Linear):  # stands for bitsandbytes' Linear4bit and friends
        pass

    model.quantized = QuantizedLinear(8, 8)
    packing = pack_linears(model)
    assert packing.replaced == 2
    assert packing.added_bytes == 50 * 8 * 4  # the head's packed copy; the embedding keeps its rows
    assert isinstance(model.proj, PackedLinear) and isinstance(model.head, PackedLinear)
    assert type(model.quantized) is QuantizedLinear
    assert pack_linears(model).replaced == 0


def test_pack_linears_leaves_a_half_precision_model_alone():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).to(torch.float16)  # bfloat16 is packed; float16 is not
    assert pack_linears(model).replaced == 0
    assert type(model[0]) is torch.nn.Linear


def test_packing_lets_go_of_the_memory_mapped_checkpoint(tiny_model_dir, tmp_path):
    """The checkpoint's mapping would keep every replaced weight resident beside its packed copy."""
    if not Path("/proc/self/maps").exists():
        pytest.skip("needs Linux's /proc to see the process's memory mappings")
    own_copy = shutil.copytree(tiny_model_dir, tmp_path / "model")  # no other test's model maps this file
    run_in_fresh_process(f"""
        from pathlib import Path
        import torch
        from shardgen.schemas.model import ModelSpec
        from shardgen.workers.engine import Engine
        from shardgen.workers.models.loader import load_model

        def mapped():
            return Path("/proc/self/maps").read_text()

        loaded = load_model(ModelSpec(model={str(own_copy)!r}), "cpu")
        checkpoint = {str(own_copy / "model.safetensors")!r}
        assert checkpoint in mapped(), "the checkpoint is expected to load memory-mapped"
        before = {{n: p.detach().clone() for n, p in loaded.model.named_parameters() if "embed" in n or "norm" in n}}
        Engine(loaded)
        assert checkpoint not in mapped(), "the engine kept the checkpoint mapped"
        after = dict(loaded.model.named_parameters())
        assert all(torch.equal(after[name], value) for name, value in before.items())  # copied, not changed
    """)


def _random_cache(loaded, slots=8, capacity=128) -> tuple[Engine, SlotCache]:
    engine = Engine(loaded, batch_size=slots)
    cache = SlotCache(engine.runner.layout, slots, capacity, "cpu")
    torch.manual_seed(0)
    for tensor in cache.keys + cache.values:
        tensor.normal_()
    return engine, cache


def test_forward_step_decodes_as_the_models_own_forward(tiny_loaded):
    assert unsupported_reason(tiny_loaded.model) is None
    engine, cache = _random_cache(tiny_loaded)
    decode = [DecodeToken(row, 100 + row, 20 + 3 * row) for row in range(5)]
    with torch.inference_mode():
        expected = engine.runner._model_decode(cache, decode)  # the model's forward over the slot cache (slot_attention)
        expected_keys = [k[:5].clone() for k in cache.keys]
        positions = torch.tensor([token.position for token in decode])
        for tensor in cache.keys:
            tensor[torch.arange(5), :, positions] = 0  # forget what the model's forward wrote; the step must write it
        parts = DecoderParts.of(tiny_loaded.model)
        logits = forward_step(parts, cache.keys, cache.values, plan_step(decode, [], "cpu"))
        one_group = forward_step(parts, cache.keys, cache.values, plan_step(decode, [], "cpu", split_groups=False))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(one_group, expected, rtol=1e-4, atol=1e-4)
    for written, reference in zip(cache.keys, expected_keys):
        torch.testing.assert_close(written[:5], reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [37, 16, 5])
def test_a_prompt_prefilled_in_chunks_gets_the_models_keys_values_and_logits(tiny_loaded, tiny_reference, chunk):
    engine, cache = _random_cache(tiny_loaded, slots=4, capacity=64)
    prompt = list(range(200, 237))
    parts = DecoderParts.of(tiny_loaded.model)
    with torch.inference_mode():
        for start in range(0, len(prompt), chunk):
            tokens = prompt[start : start + chunk]
            plan = plan_step([], [PrefillChunk(2, start, tokens, start + chunk >= len(prompt))], "cpu")
            logits = forward_step(parts, cache.keys, cache.values, plan)
        out = tiny_reference.model(input_ids=torch.tensor([prompt]), use_cache=True)
    torch.testing.assert_close(logits, out.logits[:, -1], rtol=1e-4, atol=1e-4)
    for layer, reference in enumerate(out.past_key_values.layers):
        torch.testing.assert_close(cache.keys[layer][2:3, :, : len(prompt)], reference.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.values[layer][2:3, :, : len(prompt)], reference.values, rtol=1e-5, atol=1e-5)


def test_a_mixed_step_computes_exactly_what_its_parts_compute_alone(tiny_loaded):
    """Decode tokens and prompt chunks packed into one forward: every token's numbers as in a step of its own."""
    decode = [DecodeToken(0, 5, 20), DecodeToken(1, 6, 33), DecodeToken(3, 7, 10)]
    chunks = [PrefillChunk(5, 0, list(range(100, 137)), True), PrefillChunk(6, 12, list(range(200, 230)), True)]
    engine, mixed_cache = _random_cache(tiny_loaded)
    _, alone_cache = _random_cache(tiny_loaded)
    parts = DecoderParts.of(tiny_loaded.model)
    with torch.inference_mode():
        mixed = forward_step(parts, mixed_cache.keys, mixed_cache.values, plan_step(decode, chunks, "cpu"))
        alone = torch.cat([
            forward_step(parts, alone_cache.keys, alone_cache.values, plan_step(decode, [], "cpu")),
            *(forward_step(parts, alone_cache.keys, alone_cache.values, plan_step([], [c], "cpu")) for c in chunks),
        ])
    assert mixed.shape == (5, tiny_loaded.model.config.vocab_size)
    assert torch.equal(mixed, alone)
    assert all(torch.equal(a, b) for a, b in zip(mixed_cache.keys + mixed_cache.values, alone_cache.keys + alone_cache.values))


def test_models_the_step_does_not_know_keep_the_generic_path(tiny_loaded):
    model = tiny_loaded.model
    original = model.config.model_type
    try:
        model.config.model_type = "gpt_neox"
        assert "gpt_neox" in unsupported_reason(model)
        assert Engine(tiny_loaded).runner.parts is None
    finally:
        model.config.model_type = original


def test_attention_groups_cover_the_slots_and_split_only_when_reading_less_pays():
    assert attention_groups([150] * 16) == [AttentionGroup(0, 16, 151)]  # equal lengths: one call
    mixed = [650, 600] + [150] * 14
    groups = attention_groups(mixed)
    assert [(g.start, g.stop, g.used) for g in groups] == [(0, 2, 651), (2, 16, 151)]
    ragged = [5, 700, 12, 300, 40, 40, 41, 900]
    groups = attention_groups(ragged)
    assert groups[0].start == 0 and groups[-1].stop == len(ragged)
    assert all(a.stop == b.start for a, b in zip(groups, groups[1:]))
    assert all(g.used == max(ragged[g.start : g.stop]) + 1 for g in groups)


def test_decode_groups_never_span_a_row_that_is_not_decoding():
    # rows 2 and 5 are being prefilled (or free): groups stay within runs 0-1, 3-4 and 6
    decode = [DecodeToken(row, 1, 40) for row in (0, 1, 3, 4, 6)]
    groups = decode_groups(decode)
    assert [(g.start, g.stop, g.query_start) for g in groups] == [(0, 2, 0), (3, 5, 2), (6, 7, 4)]
    assert decode_groups(decode, split=False) == groups  # equal lengths: one group per run either way


def test_plan_step_packs_decode_tokens_then_chunks_and_asks_logits_only_where_a_prompt_ends():
    decode = [DecodeToken(0, 11, 7), DecodeToken(1, 12, 3)]
    chunks = [PrefillChunk(4, 0, [1, 2, 3], wants_logits=False), PrefillChunk(2, 5, [4, 5], wants_logits=True)]
    batch = plan_step(decode, chunks, "cpu")
    assert batch.input_ids.tolist() == [11, 12, 1, 2, 3, 4, 5]
    assert batch.positions.tolist() == [7, 3, 0, 1, 2, 5, 6]
    assert batch.rows.tolist() == [0, 1, 4, 4, 4, 2, 2]
    assert [(c.row, c.start, c.length, c.offset) for c in batch.chunks] == [(4, 0, 3, 2), (2, 5, 2, 5)]
    assert batch.logit_index.tolist() == [0, 1, 6]
    assert batch.decode_tokens == 2 and batch.prefill_tokens == 5


def test_split_prefill_serves_prompts_in_admission_order_within_the_budget():
    assert split_prefill([30, 100, 20], 64) == [30, 34, 0]
    assert split_prefill([10, 5], 64) == [10, 5]
    assert split_prefill([500], 64) == [64]


def test_a_freed_kv_cache_gives_its_memory_back():
    """A worker reallocates its cache as calls need longer sequences; freed caches must not pile up in the heap."""
    run_in_fresh_process("""
        import torch
        from shardgen.workers.engine.kv_cache import SlotCache
        from shardgen.workers.engine.memory import CacheLayout, process_rss_bytes

        layout = CacheLayout(layers=30, kv_heads=3, head_dim=64, dtype=torch.float32)  # the default model's
        kept = []  # what a step leaves allocated after the cache, as the engine's steps do
        start = process_rss_bytes()
        for capacity in (300, 200, 250):  # about 200, 140 and 170 MB
            cache = SlotCache(layout, 16, capacity, "cpu")
            assert process_rss_bytes() - start > 0.9 * cache.nbytes
            kept.append(torch.ones(64, 1024))
            del cache
        grown = (process_rss_bytes() - start) / 2**20
        assert grown < 20, f"{grown:.0f} MB still held after every cache was freed"
    """)
