"""The engine's weight formats on a CPU: float32, bfloat16 (BF16 instructions), int8 (VNNI); chosen by the CPU."""

from __future__ import annotations

import types

import pytest
import torch

from shardgen.schemas.model import ModelSpec
from shardgen.schemas.sampling import SamplingParams
from shardgen.workers.engine import Engine
from shardgen.workers.engine.packed_linear import Int8Linear, PackedLinear
from shardgen.workers.engine.weight_formats import AUTO_REASON, choose_format, native_formats
from shardgen.workers.models.loader import load_model
from tests.test_engine import requests_for, token_ids

AVX512_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"})
AVX2_ONLY = frozenset({"avx2", "fma"})


def _model(hidden: int, dtype=torch.float32):
    model = torch.nn.Linear(4, 4).to(dtype)
    model.config = types.SimpleNamespace(hidden_size=hidden)
    return model


def test_auto_takes_bfloat16_where_the_cpu_has_it_and_the_model_is_large_enough():
    assert choose_format("auto", _model(576), AVX512_BF16) == ("float32", AUTO_REASON)  # asked for, never defaulted
    assert choose_format("auto", _model(576), AVX2_ONLY) == ("float32", AUTO_REASON)
    assert choose_format("bfloat16", _model(576), AVX512_BF16) == ("bfloat16", "asked for")
    assert choose_format("bfloat16", _model(576), AVX2_ONLY) == ("float32", "bfloat16 asked, but this CPU lacks its instructions")
    assert choose_format("int8", _model(576), AVX512_BF16) == ("int8", "asked for")
    assert choose_format("int8", _model(576), AVX2_ONLY) == ("float32", "int8 asked, but this CPU lacks its instructions")
    assert choose_format("float32", _model(576), AVX512_BF16)[0] == "float32"
    assert choose_format("float32", _model(576, torch.bfloat16), AVX2_ONLY)[0] == "bfloat16"
    assert native_formats(AVX2_ONLY) == ["float32"] and native_formats(AVX512_BF16) == ["float32", "bfloat16", "int8"]


@pytest.mark.parametrize("make, tolerance", [(lambda l: PackedLinear(l, dtype=torch.bfloat16), 0.02),
                                             (Int8Linear, 0.05)])
def test_a_rows_result_is_close_to_float32_and_does_not_depend_on_what_shares_its_step(make, tolerance):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 384)
    x = torch.randn(40, 256)
    packed = make(linear)
    with torch.no_grad():
        together, expected = packed(x), linear(x)
        alone = torch.cat([packed(x[i : i + 1]) for i in range(5)])
    assert together.dtype == torch.float32 and together.shape == (40, 384)
    assert (together - expected).norm() / expected.norm() < tolerance
    assert torch.equal(alone, together[:5])


def test_the_engine_packs_the_format_asked_or_says_it_fell_back(tiny_model_dir):
    params = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=20)
    for weights in ("float32", "bfloat16", "int8"):
        loaded = load_model(ModelSpec(model=str(tiny_model_dir)), "cpu")
        engine = Engine(loaded, batch_size=8, weights=weights)
        assert engine.weights == (weights if weights in native_formats() else "float32")
        kind = Int8Linear if engine.weights == "int8" else PackedLinear
        assert all(isinstance(layer.self_attn.q_proj, kind) for layer in loaded.model.model.layers)
        requests = requests_for(loaded.tokenizer, 6)
        together = engine.generate(requests, params)
        one_by_one = Engine(loaded, batch_size=1, weights=weights).generate(requests, params)
        assert token_ids(together) == token_ids(one_by_one), f"{weights}: tokens change with the batch"


def test_dtype_int8_loads_float32_weights_for_the_engine_to_pack(tiny_model_dir):
    loaded = load_model(ModelSpec(model=str(tiny_model_dir), dtype="int8"), "cpu")
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert Engine(loaded, batch_size=2).weights == ("int8" if "int8" in native_formats() else "float32")
