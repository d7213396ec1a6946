import json

import pyarrow.parquet as pq
import pytest

from shardgen.producer.collect import collect
from shardgen.schemas.layout import RunLayout
from shardgen.schemas.model import ModelSpec
from shardgen.schemas.results import decode_metadata
from shardgen.schemas.run import ColumnMapping, RunSpec
from shardgen.schemas.sampling import SamplingParams
from shardgen.schemas.shard import InputRow, Shard
from shardgen.workers.generators import make_generator
from shardgen.workers.shard_processing import process_shard
from shardgen.workers.storage import publish_result, write_run_file
from tests.conftest import EngineWrapper


@pytest.fixture()
def spec(tiny_model_dir):
    return RunSpec(
        input="mem",
        model=ModelSpec(model=str(tiny_model_dir)),
        params=SamplingParams(max_new_tokens=6, temperature=0.0),
        columns=ColumnMapping(keep_columns=("topic",), ground_truth_column="answer"),
        shard_size=4,
    )


def rows(*prompts):
    return [
        InputRow(index=i, id=f"r{i}", prompt=p, keep={"topic": f"t{i}"}, ground_truth=f"g{i}",
                 error=None if p else "prompt column 'prompt' is empty in this row")
        for i, p in enumerate(prompts)
    ]


def test_shard_file_has_every_row_its_columns_and_metadata(tmp_path, spec, tiny_loaded):
    generator = make_generator(tiny_loaded, batch_size=4)
    seen = []
    location = str(tmp_path / "attempt.parquet")
    outcome = process_shard(Shard(spec.run_id, 0, rows("hello", "", "what is up", "x " * 600)), spec, tiny_loaded,
                            generator, location, on_row=seen.append)
    assert outcome.location == location and outcome.rows == 4 and outcome.rows_failed == 2 and len(seen) == 4
    table = pq.read_table(location)
    data = table.to_pylist()
    assert [r["row_index"] for r in data] == [0, 1, 2, 3]
    assert [r["id"] for r in data] == ["r0", "r1", "r2", "r3"]
    assert [r["topic"] for r in data] == ["t0", "t1", "t2", "t3"] and data[2]["ground_truth"] == "g2"
    assert data[0]["error"] is None and data[0]["generated_tokens"] == 6 and data[0]["finish_reason"] in ("stop", "length")
    assert isinstance(data[0]["generation"], str) and data[0]["generation"]
    assert "empty" in data[1]["error"] and data[1]["finish_reason"] == "error" and data[1]["generation"] is None
    assert "context is 512" in data[3]["error"]  # longer than the tiny model's context, recorded, shard not failed
    meta = decode_metadata(table.schema.metadata)
    assert meta["run_id"] == spec.run_id and meta["shard_index"] == "0" and meta["model"] == spec.model.model
    assert meta["quantize"] == "none" and json.loads(meta["params"])["max_new_tokens"] == 6
    assert meta["device"] == "cpu" and meta["host"] and meta["version"]


def test_truncation_from_the_left_is_recorded(tmp_path, spec, tiny_loaded):
    from dataclasses import replace

    spec = replace(spec, max_prompt_tokens=48)
    outcome = process_shard(Shard(spec.run_id, 0, rows("x " * 600, "short")), spec, tiny_loaded,
                            make_generator(tiny_loaded, batch_size=4), str(tmp_path / "a.parquet"))
    data = pq.read_table(outcome.location).to_pylist()
    assert data[0]["prompt_truncated"] is True and data[0]["prompt_tokens"] == 48 and data[0]["error"] is None
    assert data[1]["prompt_truncated"] is False


def test_a_failed_write_leaves_nothing_at_the_attempt_location(tmp_path, spec, tiny_loaded):
    import pyarrow as pa

    from shardgen.workers.storage import open_output

    target = tmp_path / "attempt.parquet"
    with pytest.raises(pa.ArrowInvalid):
        with open_output(str(target)) as handle:
            handle.write(b"PAR1 half a file")
            raise pa.ArrowInvalid("the writer failed part-way")
    assert list(tmp_path.iterdir()) == []  # no half file, no temporary file


def test_collect_orders_rows_checks_completeness_and_writes_jsonl(tmp_path, spec, tiny_loaded):
    from dataclasses import replace

    spec = replace(spec, shard_size=2)
    generator = make_generator(tiny_loaded, batch_size=4)
    layout = RunLayout(str(tmp_path / "work"), spec.run_id, spec.shard_size)
    write_run_file(layout, spec, rows_total=6, shards_total=3)
    all_rows = rows("a", "b", "c", "d", "e", "f")

    def produce(index):
        location = layout.attempt_part(index, "a1-test")
        process_shard(Shard(spec.run_id, index, all_rows[index * 2 : index * 2 + 2]), spec, tiny_loaded, generator, location)
        publish_result(layout, index, location)

    for index in (2, 0):  # shard 1 missing
        produce(index)
    out = tmp_path / "out.jsonl"
    report = collect(layout, spec, 6, 3, str(out))
    assert not report.complete and report.missing_rows == [2, 3] and report.missing_shards == [1]
    assert not out.exists()
    report = collect(layout, spec, 6, 3, str(out), allow_partial=True)
    assert report.written and [json.loads(l)["row_index"] for l in out.read_text().splitlines()] == [0, 1, 4, 5]
    produce(1)
    report = collect(layout, spec, 6, 3, str(tmp_path / "out.parquet"))
    assert report.complete and pq.read_table(tmp_path / "out.parquet").column("row_index").to_pylist() == list(range(6))


def test_collect_refuses_a_part_holding_other_rows(tmp_path, spec, tiny_loaded):
    from dataclasses import replace

    from shardgen.schemas.errors import InputError

    spec = replace(spec, shard_size=2)
    layout = RunLayout(str(tmp_path / "work"), spec.run_id, spec.shard_size)
    location = layout.attempt_part(1, "a1-test")
    process_shard(Shard(spec.run_id, 0, rows("a", "b")), spec, tiny_loaded, make_generator(tiny_loaded, 4), location)
    publish_result(layout, 1, location)  # shard 0's rows under shard 1's name
    with pytest.raises(InputError, match="holds rows"):
        collect(layout, spec, 4, 2, str(tmp_path / "out.parquet"), allow_partial=True)


def test_n_samples_are_stored_as_lists(tmp_path, spec, tiny_loaded):
    from dataclasses import replace

    spec = replace(spec, params=SamplingParams(max_new_tokens=4, temperature=1.0, n=3))
    process_shard(Shard(spec.run_id, 0, rows("a")), spec, tiny_loaded, make_generator(tiny_loaded, 4), str(tmp_path / "a.parquet"))
    row = pq.read_table(tmp_path / "a.parquet").to_pylist()[0]
    assert len(row["generation"]) == 3 and len(row["finish_reason"]) == 3 and row["generated_tokens"] == 12


class RunsOutOfMemoryAboveTwo(EngineWrapper):
    """The real engine, but a batch larger than two 'runs out of memory' after finishing one row."""

    def __init__(self, engine):
        super().__init__(engine)
        self.calls = []

    def generate(self, requests, params, *, on_output=None, should_stop=None):
        from shardgen.workers.generation import EngineOOM

        self.calls.append((self.batch_size, len(requests)))
        if self.batch_size > 2 and len(requests) > 1:
            first = self.engine.generate(requests[:1], params)
            on_output(0, first[0])
            raise EngineOOM(f"out of memory at batch size {self.batch_size}")
        return self.engine.generate(requests, params, on_output=on_output)


def test_out_of_memory_halves_the_batch_and_loses_no_row(tmp_path, spec, tiny_loaded):
    generator = RunsOutOfMemoryAboveTwo(make_generator(tiny_loaded, batch_size=16))
    seen = []
    outcome = process_shard(Shard(spec.run_id, 0, rows("a", "b", "c", "d", "e")), spec, tiny_loaded, generator,
                            str(tmp_path / "a.parquet"), on_row=seen.append)
    assert outcome.batch_halvings == 3
    assert [size for size, _ in generator.calls] == [16, 8, 4, 2]
    assert [count for _, count in generator.calls] == [5, 4, 3, 2]  # each retry redoes only unfinished rows
    assert generator.batch_size == 16  # the halving lasted for this shard only, in every mode
    data = pq.read_table(outcome.location).to_pylist()
    assert [r["row_index"] for r in data] == [0, 1, 2, 3, 4] and all(r["error"] is None for r in data)
    assert len(seen) == 5


def test_collect_scores_adds_row_metadata_and_names_how_shards_were_made(tmp_path, spec, tiny_loaded):
    from dataclasses import replace

    from shardgen.schemas.errors import InputError

    spec = replace(spec, shard_size=2)
    layout = RunLayout(str(tmp_path / "work"), spec.run_id, spec.shard_size)
    all_rows = rows("a", "b", "c")
    all_rows[0].ground_truth = "definitely not generated"
    for index in (0, 1):
        location = layout.attempt_part(index, "a1-test")
        process_shard(Shard(spec.run_id, index, all_rows[index * 2 : index * 2 + 2]), spec, tiny_loaded,
                      make_generator(tiny_loaded, 4), location)
        publish_result(layout, index, location)
    out = tmp_path / "scored.jsonl"
    report = collect(layout, spec, 3, 2, str(out), score_metrics=("exact_match", "contains"), row_metadata=True)
    assert report.complete and report.score.rows == 3 and report.score.scored == 3
    assert report.score.means["exact_match"] == 0.0 and report.score.counts["contains"] == 3
    first = json.loads(out.read_text().splitlines()[0])
    assert first["score"] == {"exact_match": 0.0, "contains": 0.0}
    assert first["metadata"]["model_id"] == spec.model.model and first["metadata"]["token_count"] == 6
    assert first["metadata"]["generation_config"]["max_new_tokens"] == 6
    parquet = tmp_path / "scored.parquet"
    collect(layout, spec, 3, 2, str(parquet))
    meta = decode_metadata(pq.read_schema(parquet).metadata)
    assert meta["run_id"] == spec.run_id and meta["generator"] == "engine" and meta["quantize"] == "none"
    assert meta["weights"] == "float32"  # the tiny model is too small for auto to pick bfloat16
    with pytest.raises(InputError, match="JSONL"):
        collect(layout, spec, 3, 2, str(parquet), row_metadata=True)


def test_logprobs_are_recorded_per_generated_token(tmp_path, spec, tiny_loaded):
    import math
    from dataclasses import replace

    spec = replace(spec, params=SamplingParams(max_new_tokens=4, logprobs=3))
    outcome = process_shard(Shard(spec.run_id, 0, rows("hello", "")), spec, tiny_loaded, make_generator(tiny_loaded, 4),
                            str(tmp_path / "a.parquet"))
    first, failed = pq.read_table(outcome.location).to_pylist()
    assert len(first["logprobs"]) == first["generated_tokens"] == 4 and failed["logprobs"] is None
    for token in first["logprobs"]:
        assert len(token["top_token_ids"]) == 3 and token["logprob"] <= 0
        assert token["token_id"] == token["top_token_ids"][0]  # greedy picks the most likely token
        assert math.isclose(token["logprob"], token["top_logprobs"][0], rel_tol=1e-6)


class RunsOutOfMemoryOnceWhenAuto(EngineWrapper):
    """The real engine sized from memory, whose first call 'runs out of memory' after its first row."""

    def generate(self, requests, params, *, on_output=None, should_stop=None):
        from shardgen.workers.generation import EngineOOM

        outputs = self.engine.generate(requests, params)
        if self.auto_batch:
            on_output(0, outputs[0])
            raise EngineOOM(f"out of memory at batch size {self.batch_size}")
        return super().generate(requests, params, on_output=on_output)


def test_out_of_memory_under_auto_batch_returns_to_auto_for_the_next_shard(tmp_path, spec, tiny_loaded):
    from shardgen.workers.engine import Engine

    generator = RunsOutOfMemoryOnceWhenAuto(Engine(tiny_loaded, batch_size="auto", max_memory="64GiB"))
    outcome = process_shard(Shard(spec.run_id, 0, rows("a", "b", "c", "d")), spec, tiny_loaded, generator,
                            str(tmp_path / "a.parquet"))
    assert outcome.batch_halvings == 1 and outcome.rows == 4 and outcome.rows_failed == 0
    assert generator.engine.auto_batch  # not fixed at what the halving left


@pytest.mark.parametrize("engine", ["shardgen", "hf-generate"])
def test_a_max_length_without_room_is_that_rows_error_on_every_generator(tmp_path, spec, tiny_loaded, tiny_reference, engine):
    """One rule for "no room to generate": the row fails with the reason (never an empty `length` answer), the
    same on the engine and on transformers' generate, and the other rows are generated."""
    from dataclasses import replace

    from shardgen.workers.prompts import tokenize_row

    loaded = tiny_loaded if engine == "shardgen" else tiny_reference
    short, long = rows("hi", "a much longer prompt than the other one, with many more words in it")
    lengths = [len(tokenize_row(loaded.tokenizer, row).ids) for row in (short, long)]
    spec = replace(spec, params=SamplingParams(max_length=lengths[0] + 2, max_new_tokens=8))
    outcome = process_shard(Shard(spec.run_id, 0, [short, long]), spec, loaded,
                            make_generator(loaded, 4, engine=engine), str(tmp_path / "a.parquet"))
    fitting, refused = pq.read_table(outcome.location).to_pylist()
    assert fitting["error"] is None and fitting["generated_tokens"] == 2
    assert refused["finish_reason"] == "error" and refused["generation"] is None
    assert refused["error"].startswith(f"max_length={lengths[0] + 2} leaves no room to generate: the prompt alone has {lengths[1]}")


class RaisesOn(EngineWrapper):
    """The real engine, except that any batch holding a prompt for which `bad(prompt_ids)` is true raises."""

    def __init__(self, engine, bad, error="ValueError: this row breaks the kernel"):
        super().__init__(engine)
        self.bad, self.error = bad, error

    def generate(self, requests, params, *, on_output=None, should_stop=None):
        if any(self.bad(r.prompt_ids) for r in requests):
            raise RuntimeError(self.error)
        return super().generate(requests, params, on_output=on_output, should_stop=should_stop)


def test_a_row_that_raises_fails_alone_but_every_row_raising_fails_the_attempt(tmp_path, spec, tiny_loaded):
    from shardgen.workers.faults import WorkerFault

    engine = make_generator(tiny_loaded, batch_size=4)
    shard = Shard(spec.run_id, 0, rows("hello", "what is up", "tell me more", "and more"))
    breaking = prompt_ids(tiny_loaded, shard.rows[2], spec)
    one_bad = RaisesOn(engine, lambda ids: ids == breaking)  # the batch raises, then only that row does
    outcome = process_shard(shard, spec, tiny_loaded, one_bad, str(tmp_path / "one.parquet"))
    assert outcome.rows_failed == 1 and outcome.rows == 4
    assert "row breaks the kernel" in pq.read_table(tmp_path / "one.parquet").to_pylist()[2]["error"]
    with pytest.raises(WorkerFault, match="every one of the shard's 4 row"):
        process_shard(shard, spec, tiny_loaded, RaisesOn(engine, lambda ids: True), str(tmp_path / "all.parquet"))
    with pytest.raises(WorkerFault, match="the device failed: RuntimeError: CUDA error: an illegal memory access"):
        process_shard(shard, spec, tiny_loaded, RaisesOn(engine, lambda ids: True, "CUDA error: an illegal memory "
                      "access was encountered"), str(tmp_path / "cuda.parquet"))
    assert not (tmp_path / "all.parquet").exists() and not (tmp_path / "cuda.parquet").exists()


def prompt_ids(loaded, row, spec):
    from shardgen.workers.prompts import tokenize_row

    return tokenize_row(loaded.tokenizer, row, chat_template=spec.chat_template).ids
