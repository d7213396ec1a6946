"""Every architecture shardgen accepts gives transformers' tokens, whichever path serves it.

Tiny random models of each architecture are served the way every shardgen entry point serves them
(`make_generator`, batch 8, ragged prompts) and compared with transformers' `generate` run one prompt at a time
on a separately loaded copy (the engine packs the weights of the model it is given)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardgen.schemas.model import ModelSpec
from shardgen.schemas.sampling import SamplingParams
from shardgen.workers import engine as engine_paths
from shardgen.workers.generators.hf_generate import HFGenerate
from shardgen.workers.generation import GenerationRequest
from shardgen.schemas.runtime import ENVIRONMENT, RuntimeOptions
from shardgen.workers.generators import make_generator
from shardgen.workers.models.loader import LoadedModel, load_model
from tests.conftest import chat_ids
from tests.test_engine import QUESTIONS
from tests.tiny_architectures import ARCHITECTURES, build_architecture

BATCH = 8
KNOWN_PATHS = {getattr(engine_paths, name) for name in dir(engine_paths) if name.startswith("PATH_")}
ENGINE_OWN_STEP = ("llama", "qwen2")
"""Llama-family models the engine decodes with its own step: they must stay on the fast path."""


class Served:
    def __init__(self, name: str, directory: Path):
        self.name = name
        self.directory = directory
        self.loaded: LoadedModel = load_model(ModelSpec(model=str(directory)), "cpu")
        self.reference: LoadedModel = load_model(ModelSpec(model=str(directory)), "cpu")


@pytest.fixture(scope="module", params=ARCHITECTURES)
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Served:
    directory = build_architecture(request.param, tmp_path_factory.mktemp(request.param) / "model")
    return Served(request.param, directory)


@pytest.fixture(autouse=True)
def default_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENVIRONMENT["engine"], raising=False)


def ragged_requests(tokenizer, seed_base: int = 0) -> list[GenerationRequest]:
    """Ten prompts from 1 to about 60 tokens: chat-templated questions and two short raw texts."""
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS[:8]] + [
        tokenizer("Hi")["input_ids"],
        tokenizer("Once upon a time, in a land far away,")["input_ids"],
    ]
    return [GenerationRequest(ids, seed=seed_base + i) for i, ids in enumerate(prompts)]


def token_ids(outputs) -> list[list[list[int]]]:
    return [[s.token_ids for s in o.samples] for o in outputs]


def test_greedy_batch_gives_the_tokens_of_transformers_one_prompt_at_a_time(served: Served):
    requests = ragged_requests(served.loaded.tokenizer)
    params = SamplingParams(max_new_tokens=12)
    generator = make_generator(served.loaded, BATCH)
    got = generator.generate(requests, params)
    expected = HFGenerate(served.reference, 1).generate(requests, params)
    path = getattr(generator, "last_path", generator.name)
    assert token_ids(got) == token_ids(expected), f"{served.name} served wrongly through {path!r}"
    assert len({t for o in expected for s in o.samples for t in s.token_ids}) > 12, "the model's output must vary"
    assert path in KNOWN_PATHS | {"hf-generate"}
    if served.name in ENGINE_OWN_STEP:
        assert path == engine_paths.PATH_ENGINE


def test_shared_prefixes_computed_once_give_the_tokens_of_transformers(served: Served):
    """Prompts behind one system prompt: through the engine the shared blocks are prefilled once (its own step or
    the model's forward after a cached prefix), and greedy tokens stay those of transformers one at a time."""
    from tests.test_prefix_cache import shared_prefix_requests

    requests = shared_prefix_requests(served.loaded.tokenizer, 8)
    params = SamplingParams(max_new_tokens=12)
    generator = make_generator(served.loaded, BATCH)
    got = generator.generate(requests, params)
    expected = HFGenerate(served.reference, 1).generate(requests, params)
    path = getattr(generator, "last_path", generator.name)
    assert token_ids(got) == token_ids(expected), f"{served.name} with a prefix cache through {path!r}"
    if path == engine_paths.PATH_ENGINE:
        assert generator.stats.reused_prefix_tokens >= (len(requests) - 1) * 48, f"{served.name}: no prefix reused"


def test_sampled_tokens_for_a_seed_do_not_depend_on_the_batch(served: Served):
    # top_k keeps the draw away from float noise: over a random model's flat distribution thousands of tokens
    # share the probability mass, and a 1e-6 difference between batch shapes would move a draw across a boundary.
    requests = ragged_requests(served.loaded.tokenizer, seed_base=100)
    params = SamplingParams(max_new_tokens=10, temperature=0.7, top_k=20)
    together = make_generator(served.loaded, BATCH).generate(requests, params)
    smaller_reversed = make_generator(served.loaded, 3).generate(requests[::-1], params)[::-1]
    assert token_ids(together) == token_ids(smaller_reversed), f"{served.name}: sampled tokens change with the batch"
    reseeded = [GenerationRequest(r.prompt_ids, seed=r.seed + 1000) for r in requests[:2]]
    assert token_ids(make_generator(served.loaded, BATCH).generate(reseeded, params)) != token_ids(together[:2])


def test_the_result_file_names_the_path_that_served_an_architecture(tmp_path):
    """Gemma 2 (sliding-window and global layers in one cache) is served by whichever path is exact for it; the
    collected Parquet file's metadata says which, as the generator reported it."""
    import pyarrow.parquet as pq

    from shardgen.producer.embedded import run_embedded
    from shardgen.schemas.results import decode_metadata
    from shardgen.schemas.run import RunSpec
    from tests.conftest import write_jsonl

    directory = build_architecture("gemma2", tmp_path / "gemma2")
    data = write_jsonl(tmp_path / "q.jsonl", [{"prompt": q} for q in QUESTIONS[:3]])
    spec = RunSpec(input=str(data), model=ModelSpec(model=str(directory)), params=SamplingParams(max_new_tokens=4))
    run_embedded(spec, tmp_path / "out.parquet", RuntimeOptions(device="cpu", batch_size=BATCH))
    loaded = load_model(ModelSpec(model=str(directory)), "cpu")
    generator = make_generator(loaded, BATCH)
    generator.generate(ragged_requests(loaded.tokenizer)[:2], SamplingParams(max_new_tokens=2))
    recorded = decode_metadata(pq.read_metadata(tmp_path / "out.parquet").metadata)["generator"]
    assert recorded == getattr(generator, "last_path", generator.name) and recorded in KNOWN_PATHS | {"hf-generate"}
