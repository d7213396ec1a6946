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


def make_adapter(base: Path, target: Path, seed: int, rank: int = 8) -> Path:
    """A LoRA adapter of `base` with random (not zero) weights, so it changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("adapter")
    base = build_architecture("llama", root / "base", hidden=VLLM_HIDDEN)
    return base, make_adapter(base, root / "adapter", seed=0)


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


def test_rows_name_their_own_adapters_over_one_vllm_base(base_and_adapter, tmp_path):
    """--adapter-column: each row through its adapter (or the base, for an empty cell), as the engine serves that
    adapter merged; a row whose adapter is not one fails alone; other engines refuse the column in one line."""
    import pyarrow.parquet as pq

    from tests.conftest import run_cli

    base, first = base_and_adapter
    second = make_adapter(base, tmp_path / "second", seed=1, rank=16)
    questions = ["What is the capital of France?", "Name a prime number.", "Why is the sky blue?", "Say hello."]
    choice = [str(first), "", str(second), str(first), str(tmp_path), str(second)]
    rows = [{"prompt": questions[i % 4], "adapter": a} for i, a in enumerate(choice)]
    data = write_jsonl(tmp_path / "q.jsonl", rows)
    common = ["-o", str(tmp_path / "out.parquet"), "--model", str(base), "--device", "cpu", "--max-new-tokens", "10",
              "--adapter-column", "adapter", "--max-memory", "64MiB"]
    result = run_cli("run", str(data), *common, "--engine", "vllm")
    assert result.returncode == 0, result.stderr
    got = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert "not a LoRA adapter directory" in got[4]["error"]
    for model, positions in ((first, [0, 3]), (base, [1]), (second, [2, 5])):
        data_rows = write_jsonl(tmp_path / "one.jsonl", [{"prompt": rows[p]["prompt"]} for p in positions])
        out = tmp_path / f"{model.name}.parquet"
        one = run_cli("run", str(data_rows), "-o", str(out), "--model", str(model), "--device", "cpu",
                      "--max-new-tokens", "10", "--engine", "shardgen")
        assert one.returncode == 0, one.stderr
        expected = [r["generation"] for r in pq.read_table(out).to_pylist()]
        assert [got[p]["generation"] for p in positions] == expected, f"rows {positions} not served by {model.name}"
    refused = run_cli("run", str(data), *common, "--engine", "shardgen", "--overwrite")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        "error: per-row adapters (--adapter-column) run on vLLM, not on engine: add --engine vllm, or pass one "
        "adapter directory as --model")
