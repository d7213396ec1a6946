"""PEFT/LoRA adapter directories as --model: merged into the base on shardgen's engine and hf-generate, a LoRA
request over the base on vLLM; the result records base and adapter. The adapter is made here, with peft."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from shardgen.schemas.errors import ModelError
from shardgen.schemas.model import ModelSpec
from shardgen.schemas.results import decode_metadata
from shardgen.schemas.run import RunSpec
from shardgen.schemas.runtime import RuntimeOptions
from shardgen.schemas.sampling import SamplingParams
from shardgen.workers.generators import load_generator, make_generator
from shardgen.workers.models.loader import load_model
from tests.conftest import write_jsonl
from tests.test_architectures import ragged_requests, token_ids
from tests.test_vllm import VLLM_HIDDEN, vllm_runtime
from tests.tiny_architectures import build_architecture

GREEDY = SamplingParams(max_new_tokens=12)


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny llama and a rank-8 LoRA adapter of it with random (not zero) weights, so it changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapter")
    base = build_architecture("llama", root / "base", hidden=VLLM_HIDDEN)
    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
    peft_model.save_pretrained(root / "adapter")
    return base, root / "adapter"


def test_the_engine_serves_an_adapter_merged_into_its_base(base_and_adapter):
    base, adapter = base_and_adapter
    loaded = load_model(ModelSpec(model=str(adapter)), "cpu")
    assert loaded.source == str(base) and loaded.info["adapter"] == str(adapter)
    requests = ragged_requests(loaded.tokenizer)
    tuned = token_ids(make_generator(loaded, 8).generate(requests, GREEDY))
    plain = token_ids(make_generator(load_model(ModelSpec(model=str(base)), "cpu"), 8).generate(requests, GREEDY))
    assert tuned != plain, "the adapter must change the answers"
    assert tuned == token_ids(make_generator(loaded, 8, engine="hf-generate").generate(requests, GREEDY))


def test_vllm_serves_the_adapter_as_a_lora_request_with_the_engines_tokens(base_and_adapter):
    base, adapter = base_and_adapter
    merged = load_model(ModelSpec(model=str(adapter)), "cpu")
    requests = ragged_requests(merged.tokenizer)
    expected = token_ids(make_generator(merged, 8).generate(requests, GREEDY))
    loaded, generator = load_generator(ModelSpec(model=str(adapter)), vllm_runtime(batch_size=8))
    try:
        got = token_ids(generator.generate(requests, GREEDY))
    finally:
        generator.close()
    assert loaded.source == str(base) and loaded.info["adapter"] == str(adapter)
    assert got == expected


def test_the_result_records_base_and_adapter(base_and_adapter, tmp_path):
    from shardgen.producer.embedded import run_embedded

    base, adapter = base_and_adapter
    data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "Hello"}, {"prompt": "What is 2+2?"}])
    spec = RunSpec(input=str(data), model=ModelSpec(model=str(adapter)), params=SamplingParams(max_new_tokens=4))
    run_embedded(spec, tmp_path / "out.parquet", RuntimeOptions(device="cpu", engine="shardgen", batch_size=2))
    meta = decode_metadata(pq.read_metadata(tmp_path / "out.parquet").metadata)
    assert (meta["model"], meta["model_source"], meta["adapter"]) == (str(adapter), str(base), str(adapter))


def test_an_adapter_without_a_base_is_one_line(tmp_path):
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    with pytest.raises(ModelError, match="names no base model .*: set it to the base model's directory or hub id"):
        load_model(ModelSpec(model=str(tmp_path)), "cpu")
