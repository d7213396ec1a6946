import json
import pytest

from click.testing import CliRunner

from shardgen.producer.bench import bench
from shardgen.producer.bench.prompts import equal_prompts, ragged_prompts
from tests.conftest import run_in_fresh_process


def test_bench_json_structure_and_ratios_against_hf(tiny_model_dir):
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--prompts", "5", "--batch-size", "2",
            "--max-new-tokens", "4", "--no-kv-cache", "--json"]  # default generators: engine and HF generate
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["config"]["batch_size"] == "2" and report["config"]["hf_batch_size"] == 2
    rows = {(r["workload"], r["generator"], r["prefix_cache"]): r for r in report["results"]}
    engine_rows = {(w, "engine", cached) for w in ("ragged", "equal", "prefix", "structured") for cached in (True, False)}
    hf_rows = {(w, g, None) for w in ("ragged", "equal", "prefix", "structured") for g in ("hf-generate", "hf-generate-no-cache")}
    assert set(rows) == engine_rows | hf_rows  # every workload by default, the engine with its prefix cache on and off
    for (workload, _, _), row in rows.items():
        baseline = rows[(workload, "hf-generate", None)]
        assert row["ratio_vs_hf"] == row["tokens_per_s"] / baseline["tokens_per_s"]
        assert row["useful_tokens"] > 0 and row["ttft_p50_s"] <= row["ttft_p95_s"]
        assert 0 <= row["padding_waste"] < 1 and row["peak_rss_mb"] > 100 and row["batch_size"] == 2
    assert rows[("equal", "engine", True)]["useful_tokens"] == 5 * 4  # EOS ignored: every prompt gets the full length
    assert rows[("ragged", "engine", False)]["padding_waste"] == 0
    assert rows[("ragged", "hf-generate-no-cache", None)]["padding_waste"] > rows[("ragged", "engine", True)]["padding_waste"]
    cached, uncached = rows[("prefix", "engine", True)], rows[("prefix", "engine", False)]
    assert cached["reused_prefix_tokens"] >= 4 * 400 and uncached["reused_prefix_tokens"] == 0
    assert cached["padding_waste"] == 0  # reused prompt tokens are not counted as computed
    assert cached["ratio_vs_no_prefix_cache"] == cached["tokens_per_s"] / uncached["tokens_per_s"]
    assert uncached["ratio_vs_no_prefix_cache"] is None
    engine = rows[("equal", "engine", True)]
    assert 0 < engine["batch_occupancy"] <= 1 and engine["kv_cache_mb"] > 0
    assert engine["memory_vs_model_and_cache"] > 0
    memory = report["memory"]
    assert memory["rss_before_load_mb"] < memory["rss_loaded_mb"] <= memory["rss_engine_mb"] + 50
    assert memory["runtime_mb"] == memory["rss_loaded_mb"] - memory["model_footprint_mb"] > 0


def test_bench_batch_size_auto_sizes_the_engine_and_runs_hf_generate_at_16(tiny_model_dir):
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--prompts", "5", "--batch-size", "auto",
            "--max-memory", "64GiB", "--workload", "equal", "--max-new-tokens", "2", "--prefix-cache", "off", "--json"]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output
    rows = {r["generator"]: r for r in json.loads(result.stdout)["results"]}
    assert rows["engine"]["batch_size"] == 5  # room for many more slots; five prompts fill five
    assert rows["hf-generate"]["batch_size"] == 16


def test_bench_runs_the_engine_at_each_batch_size_given(tiny_model_dir):
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--prompts", "5", "--batch-size", "2,auto",
            "--workload", "ragged", "--max-new-tokens", "2", "--generators", "engine", "--prefix-cache", "on", "--json"]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert [(r["generator"], r["batch_size"]) for r in rows] == [("engine", 2), ("engine", 5)]
    assert rows[0]["kv_cache_mb"] < rows[1]["kv_cache_mb"]  # each run sized its own cache


def test_bench_refuses_a_bad_batch_size(tiny_model_dir):
    result = CliRunner().invoke(bench, ["--model", str(tiny_model_dir), "--batch-size", "16,lots"])
    assert result.exit_code != 0 and "positive integers or auto" in result.output


def test_bench_refuses_unknown_generator(tiny_model_dir):
    result = CliRunner().invoke(bench, ["--model", str(tiny_model_dir), "--generators", "engine,beam-me-up"])
    assert result.exit_code != 0 and "unknown generator" in result.output


def test_prompt_sets_are_deterministic_and_shaped(tiny_loaded):
    tokenizer = tiny_loaded.tokenizer
    ragged = ragged_prompts(tokenizer, 128, seed=1)
    assert ragged == ragged_prompts(tokenizer, 128, seed=1) != ragged_prompts(tokenizer, 128, seed=2)
    lengths = sorted(map(len, ragged))
    assert lengths[0] < 50 and lengths[-1] > 400  # a long tail, as real datasets have
    assert 90 < sum(lengths) / len(lengths) < 150
    equal = equal_prompts(tokenizer, 10, 64)
    assert {len(p) for p in equal} == {64} and len({tuple(p) for p in equal}) == 10


def test_peak_memory_is_the_process_peak_during_the_block_not_before():
    run_in_fresh_process("""
        import torch
        from shardgen.producer.bench.engine import PeakMemory

        before = torch.ones(50_000_000)  # 200 MB at its peak before the block, freed before it starts
        del before
        with PeakMemory("cpu") as allocating:
            block = torch.ones(50_000_000)  # 200 MB inside the block
            del block
        with PeakMemory("cpu") as idle:
            pass
        grown = (allocating.peak_bytes - allocating.start_bytes) / 2**20
        assert 190 <= grown < 260, grown
        assert (idle.peak_bytes - idle.start_bytes) / 2**20 < 20
    """)


def test_the_prefix_workload_shares_400_tokens_and_its_rows_are_short(tiny_loaded):
    from shardgen.producer.bench.prompts import shared_prefix_prompts

    prompts = shared_prefix_prompts(tiny_loaded.tokenizer, 32, seed=0)
    assert prompts == shared_prefix_prompts(tiny_loaded.tokenizer, 32, seed=0)
    first = prompts[0]
    shared = min(next((i for i, (a, b) in enumerate(zip(first, p)) if a != b), len(p)) for p in prompts[1:])
    assert 400 <= shared < 430
    assert all(len(p) - shared < 40 for p in prompts) and len({tuple(p) for p in prompts}) > 16


def test_bench_structured_workload_beside_free_text_in_one_run(tiny_model_dir):
    args = ["--model", str(tiny_model_dir), "--device", "cpu", "--prompts", "4", "--batch-size", "4",
            "--workload", "ragged,structured", "--max-new-tokens", "48", "--json"]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output
    rows = {(r["workload"], r["generator"]): r for r in json.loads(result.stdout)["results"]}
    assert set(rows) == {(w, g) for w in ("ragged", "structured") for g in ("engine", "hf-generate")}
    for generator in ("engine", "hf-generate"):
        structured, free = rows[("structured", generator)], rows[("ragged", generator)]
        assert structured["ratio_vs_free_text"] == structured["tokens_per_s"] / free["tokens_per_s"]
        assert 0 <= structured["valid_outputs"] <= 4 and "x ragged's tokens/s" in structured["note"]
    assert CliRunner().invoke(bench, ["--model", str(tiny_model_dir), "--workload", "ragged,jsonish"]).exit_code != 0


@pytest.mark.redis
def test_bench_queue_reports_each_shard_size_and_shards_in_flight_with_occupancy(tiny_model_dir):
    from shardgen.producer.bench.queue import bench_queue

    args = ["--model", str(tiny_model_dir), "--rows", "12", "--shard-size", "3,6", "--shards-in-flight", "1,2",
            "--batch-size", "4", "--max-new-tokens", "16", "--json"]  # long enough for decoding to dominate
    result = CliRunner().invoke(bench_queue, args)
    assert result.exit_code == 0, result.output
    rows = {(r["shard_size"], r["shards_in_flight"]): r for r in json.loads(result.stdout)}
    assert set(rows) == {(size, flights) for size in (3, 6) for flights in (None, 1, 2)}
    for (size, flights), row in rows.items():
        assert row["rows"] == 12 and row["tokens"] > 0
        embedded = rows[(size, None)]
        assert row["ratio_to_embedded"] == pytest.approx(row["tokens_per_s"] / embedded["tokens_per_s"])
        if flights is not None:
            assert 0 < row["occupancy"] <= 1
    # shards of 3 rows on a batch of 4: one shard at a time never fills the batch; with two in flight the next
    # shard's rows take the free slot
    assert rows[(3, 1)]["occupancy"] <= 0.75 and rows[(3, 2)]["occupancy"] > rows[(3, 1)]["occupancy"]
def test_bench_measures_vllm_on_the_engines_prompts(tmp_path):
    """`--generators engine,vllm,hf-generate`: one run, the same prompt ids, vLLM's version in the path column."""
    from tests.test_vllm import VLLM_HIDDEN
    from tests.tiny_architectures import build_architecture

    model = build_architecture("llama", tmp_path / "model", hidden=VLLM_HIDDEN)
    args = ["--model", str(model), "--device", "cpu", "--prompts", "4", "--batch-size", "2", "--max-new-tokens", "4",
            "--workload", "equal", "--generators", "engine,vllm,hf-generate", "--max-memory", "64MiB", "--json"]
    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 0, result.output
    rows = {r["generator"]: r for r in json.loads(result.stdout)["results"]}
    assert list(rows) == ["engine", "vllm", "hf-generate"]
    assert rows["vllm"]["useful_tokens"] == rows["engine"]["useful_tokens"] == 4 * 4
    assert rows["vllm"]["path"].startswith("vllm 0.") and rows["vllm"]["batch_size"] == 2
    assert rows["vllm"]["ratio_vs_hf"] == rows["vllm"]["tokens_per_s"] / rows["hf-generate"]["tokens_per_s"]


def test_bench_queue_runs_both_modes_with_a_vllm_worker(tmp_path):
    from shardgen.producer.bench.queue import bench_queue
    from tests.test_vllm import VLLM_HIDDEN
    from tests.tiny_architectures import build_architecture

    model = build_architecture("llama", tmp_path / "model", hidden=VLLM_HIDDEN)
    args = ["--model", str(model), "--rows", "8", "--shard-size", "4", "--batch-size", "4", "--max-new-tokens", "4",
            "--engine", "vllm", "--max-memory", "64MiB", "--shards-in-flight", "1", "--json"]
    result = CliRunner().invoke(bench_queue, args)
    assert result.exit_code == 0, result.output
    modes = {r["mode"]: r for r in json.loads(result.stdout)}
    assert {r["rows"] for r in modes.values()} == {8}
    assert modes["distributed (submit + 1 worker)"]["tokens"] == modes["embedded (run)"]["tokens"] > 0
