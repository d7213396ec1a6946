"""Real `shardgen worker --engine vllm` processes keep shardgen's guarantees: a worker SIGKILLed mid-shard loses
and doubles no row, SIGTERM gives the running shard back within its grace, cancel stops it mid-shard, and the
distributed rows equal `shardgen run --engine vllm`'s (greedy).

Mid-shard is held, not hoped for: `tests.held_generator:held_vllm` finishes a shard's first row inside vLLM, then
waits on the test's hold file with the shard's other requests still in vLLM's engine."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from shardgen.schemas.results import decode_metadata
from tests.conftest import run_cli, run_status_now, wait_until, write_jsonl
from tests.test_distributed import make_rows, wait_for_end
from tests.test_faults import collect_exactly_once
from tests.test_fleet import hold_file, submit
from tests.test_vllm import VLLM_HIDDEN
from tests.tiny_architectures import build_architecture

HELD_VLLM = "tests.held_generator:held_vllm"
VLLM_FLAGS = ("--max-memory", "64MiB")
"""vLLM's KV cache for each test worker (its CPU default would be 1 GiB)."""
JOB = ("--shard-size", "8", "--max-new-tokens", "12")


@pytest.fixture(scope="module")
def vllm_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_architecture("llama", tmp_path_factory.mktemp("vllm-worker") / "model", hidden=VLLM_HIDDEN)


def vllm_worker(start_worker, model: str, broker: str, engine: str = "vllm"):
    return start_worker(model, broker, "--engine", engine, *VLLM_FLAGS)


def mid_shard(run_id: str, broker: str) -> dict:
    """Wait until a shard is running with at least one of its rows finished (and reported), and return the status."""
    return wait_until(lambda: (s := run_status_now(run_id, broker))["shards_running"] == 1 and s["rows_in_progress"] >= 1 and s,
                      timeout=180, what="a shard running with a row finished")


def test_a_vllm_worker_killed_mid_shard_loses_and_doubles_no_row_and_matches_run(tmp_path, redis_url, vllm_model_dir,
                                                                                start_worker, monkeypatch):
    monkeypatch.setenv("SHARDGEN_LEASE_SECONDS", "4")
    hold = hold_file(tmp_path, monkeypatch)
    model = str(vllm_model_dir)
    data = write_jsonl(tmp_path / "q.jsonl", make_rows(16))
    doomed = vllm_worker(start_worker, model, redis_url, HELD_VLLM)
    run_id = submit(data, tmp_path / "work", redis_url, model, *JOB)
    mid_shard(run_id, redis_url)
    doomed.kill(signal.SIGKILL)
    hold.unlink()
    vllm_worker(start_worker, model, redis_url, HELD_VLLM)  # the hold is gone: it runs freely
    status = wait_for_end(run_id, redis_url, timeout=300)
    assert status["state"] == "done" and status["reassigned"] == 1 and status["rows_done"] == 16
    distributed = collect_exactly_once(run_id, redis_url, tmp_path, 16)

    embedded = tmp_path / "embedded.parquet"
    result = run_cli("run", str(data), "-o", str(embedded), "--model", model, "--device", "cpu", "--engine", "vllm",
                     *VLLM_FLAGS, *JOB)
    assert result.returncode == 0, result.stderr
    rows = pq.read_table(embedded).to_pylist()
    assert [(r["generation"], r["generated_tokens"]) for r in rows] == [(r["generation"], r["generated_tokens"]) for r in distributed]
    assert decode_metadata(pq.read_metadata(embedded).metadata)["generator"].startswith("vllm 0.")
    part = sorted((tmp_path / "work" / run_id).glob("part-*.parquet"))[0]
    assert decode_metadata(pq.read_metadata(part).metadata)["generator"].startswith("vllm 0.")


def test_sigterm_gives_a_vllm_workers_shard_back_within_its_grace(tmp_path, redis_url, vllm_model_dir, start_worker,
                                                                  monkeypatch):
    monkeypatch.setenv("SHARDGEN_LEASE_SECONDS", "120")  # a lease expiry would take two minutes
    hold = hold_file(tmp_path, monkeypatch)
    model = str(vllm_model_dir)
    leaving = vllm_worker(start_worker, model, redis_url, HELD_VLLM)
    run_id = submit(write_jsonl(tmp_path / "q.jsonl", make_rows(8)), tmp_path / "work", redis_url, model, *JOB)
    mid_shard(run_id, redis_url)
    leaving.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    status = wait_until(lambda: (s := run_status_now(run_id, redis_url))["shards_queued"] == 1 and s, timeout=60,
                        what="the shard to be given back")
    assert time.monotonic() - signalled < 20
    assert status["reassigned"] == 0 and status["retries"] == 0 and status["shards_running"] == 0
    assert leaving.process.wait(60) == 0
    assert "given back to its queue" in leaving.log_path.read_text(errors="replace")
    hold.unlink()
    vllm_worker(start_worker, model, redis_url, HELD_VLLM)  # the hold is gone: it runs freely
    assert wait_for_end(run_id, redis_url, timeout=300)["state"] == "done"
    collect_exactly_once(run_id, redis_url, tmp_path, 8)


def test_cancel_stops_a_vllm_shard_mid_way_and_the_worker_serves_the_next_run(tmp_path, redis_url, vllm_model_dir,
                                                                              start_worker, monkeypatch):
    hold = hold_file(tmp_path, monkeypatch)
    model = str(vllm_model_dir)
    worker = vllm_worker(start_worker, model, redis_url, HELD_VLLM)
    data = write_jsonl(tmp_path / "q.jsonl", make_rows(8))
    run_id = submit(data, tmp_path / "work", redis_url, model, *JOB)
    mid_shard(run_id, redis_url)
    cancelled = run_cli("cancel", run_id, "--broker", redis_url)
    assert cancelled.returncode == 0, cancelled.stderr
    status = wait_until(lambda: (s := run_status_now(run_id, redis_url))["shards_running"] == 0 and s, timeout=30,
                        what="the running shard to stop")
    assert status["state"] == "cancelled" and status["shards_done"] == 0 and status["shards_cancelled"] == 1
    hold.unlink()
    assert worker.process.poll() is None
    next_run = submit(data, tmp_path / "work", redis_url, model, *JOB)
    assert wait_for_end(next_run, redis_url, timeout=180)["state"] == "done"
    collect_exactly_once(next_run, redis_url, tmp_path, 8)
