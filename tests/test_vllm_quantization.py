"""Quantized checkpoints through vLLM: what `shardgen quantize` writes (GPTQ as compressed-tensors, 4-bit) serves
on vLLM's CPU build in bfloat16; what that build cannot run is refused in one line naming the engine that can."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from shardgen.producer.quantize import quantize
from shardgen.schemas.errors import ModelError
from shardgen.schemas.model import ModelSpec
from shardgen.schemas.sampling import SamplingParams
from shardgen.workers.generators import load_generator, make_generator
from shardgen.workers.models.loader import load_model
from tests.conftest import run_cli, write_jsonl
from tests.test_architectures import ragged_requests, token_ids
from tests.test_vllm import VLLM_HIDDEN, vllm_runtime
from tests.tiny_architectures import build_architecture

AGREED_PREFIX = 3
"""vLLM's CPU kernel for 4-bit weights computes in bfloat16 and the engine in float32: greedy paths agree on at
least this many first tokens of every row, and whole for most rows, before rounding sends one elsewhere."""


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = build_architecture("llama", tmp_path_factory.mktemp("vllm-quant") / "model", hidden=VLLM_HIDDEN)
    output = base.parent / "gptq-4bit"
    result = CliRunner().invoke(quantize, [str(base), "--bits", "4", "--samples", "12", "--max-tokens", "64",
                                           "-o", str(output)])
    assert result.exit_code == 0, result.output
    return output


def test_a_shardgen_quantize_checkpoint_serves_on_vllm_close_to_the_engine(gptq_dir):
    engine_loaded = load_model(ModelSpec(model=str(gptq_dir)), "cpu")
    requests = ragged_requests(engine_loaded.tokenizer)
    params = SamplingParams(max_new_tokens=12)
    expected = token_ids(make_generator(engine_loaded, 8).generate(requests, params))
    loaded, generator = load_generator(ModelSpec(model=str(gptq_dir)), vllm_runtime(batch_size=8))
    try:
        got = token_ids(generator.generate(requests, params))
    finally:
        generator.close()
    assert loaded.info["checkpoint_quantization"] == "compressed-tensors"
    assert all(g[0][:AGREED_PREFIX] == e[0][:AGREED_PREFIX] for g, e in zip(got, expected))
    assert sum(g == e for g, e in zip(got, expected)) >= len(requests) // 2


def test_an_8_bit_checkpoint_is_refused_on_vllms_cpu_build(gptq_dir, tmp_path):
    eight = shutil.copytree(gptq_dir, tmp_path / "gptq-8bit")
    config = json.loads((eight / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    (eight / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="runs 4-bit compressed-tensors checkpoints only.*use --engine shardgen"):
        load_generator(ModelSpec(model=str(eight)), vllm_runtime())


def test_bitsandbytes_with_vllm_on_cpu_is_one_line_from_the_cli(gptq_dir, tmp_path):
    data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}])
    plain = gptq_dir.parent / "model"
    result = run_cli("run", str(data), "-o", str(tmp_path / "out.jsonl"), "--model", str(plain), "--device", "cpu",
                     "--engine", "vllm", "--quantize", "nf4")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: bitsandbytes (nf4) does not run on vLLM's CPU build: use --engine shardgen (it runs nf4, fp4 and int8 on cpu)"
    ]
