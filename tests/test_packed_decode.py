"""The engine's fast path on the CPU: packed linear layers and its own decode step for llama-family models."""

import pytest
import torch

from shardgen.workers.engine.llama_step import (
    AttentionGroup,
    DecoderParts,
    attention_groups,
    decode_step,
    prefill_step,
    unsupported_reason,
)
from shardgen.workers.engine import Engine
from shardgen.workers.engine.scheduler import _Slot
from shardgen.workers.engine.packed_linear import PackedLinear, pack_linears


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
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).to(torch.bfloat16)
    assert pack_linears(model).replaced == 0
    assert type(model[0]) is torch.nn.Linear


def _engine_mid_generation(loaded, active):
    """An engine whose cache holds random keys and values for `active` slots of different lengths."""
    engine = Engine(loaded, batch_size=8)
    engine._ensure_buffers(8, 64)
    torch.manual_seed(0)
    for tensor in engine.cache.keys + engine.cache.values:
        tensor.normal_()
    slots = [_Slot(0, i, list(range(10, 20 + 3 * i)), 16, None, tokens=[100 + i]) for i in range(active)]
    return engine, slots


def test_decode_step_gives_the_logits_and_cache_entries_of_the_models_own_forward(tiny_loaded):
    assert unsupported_reason(tiny_loaded.model) is None
    engine, slots = _engine_mid_generation(tiny_loaded, active=5)
    input_ids = torch.tensor([s.tokens[-1] for s in slots])
    positions = torch.tensor([s.position for s in slots])
    everyone = [AttentionGroup(0, 5, int(positions.max()) + 1)]
    with torch.inference_mode():
        expected = engine._model_step(input_ids, positions, everyone)
        expected_keys = [k[:5].clone() for k in engine.cache.keys]
        for tensor in engine.cache.keys:
            tensor[torch.arange(5), :, positions] = 0  # forget what the model's forward wrote; decode_step must write it again
        parts = DecoderParts.of(tiny_loaded.model)
        logits = decode_step(parts, engine.cache.keys, engine.cache.values, input_ids, positions, everyone)
        split = [AttentionGroup(0, 2, 24), AttentionGroup(2, 3, 26), AttentionGroup(3, 5, 32)]
        logits_split = decode_step(parts, engine.cache.keys, engine.cache.values, input_ids, positions, split)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits_split, expected, rtol=1e-4, atol=1e-4)
    for written, reference in zip(engine.cache.keys, expected_keys):
        torch.testing.assert_close(written[:5], reference, rtol=1e-5, atol=1e-5)


def test_models_the_decode_step_does_not_know_keep_the_generic_path(tiny_loaded):
    model = tiny_loaded.model
    original = model.config.model_type
    try:
        model.config.model_type = "gpt_neox"
        assert "gpt_neox" in unsupported_reason(model)
        assert Engine(tiny_loaded)._parts is None
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


def test_prefill_step_writes_the_keys_and_values_the_models_forward_computes(tiny_loaded, tiny_reference):
    engine = Engine(tiny_loaded, batch_size=4)
    engine._ensure_buffers(4, 64)
    prompt = list(range(200, 237))
    with torch.inference_mode():
        logits = prefill_step(DecoderParts.of(tiny_loaded.model), engine.cache.keys, engine.cache.values, torch.tensor(prompt), 2)
        out = tiny_reference.model(input_ids=torch.tensor([prompt]), use_cache=True)
    torch.testing.assert_close(logits, out.logits[:, -1], rtol=1e-4, atol=1e-4)
    for layer, reference in enumerate(out.past_key_values.layers):
        torch.testing.assert_close(engine.cache.keys[layer][2:3, :, : len(prompt)], reference.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(engine.cache.values[layer][2:3, :, : len(prompt)], reference.values, rtol=1e-5, atol=1e-5)
