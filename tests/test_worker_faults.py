"""Faults a real fleet has beyond a killed worker: a sick device, an outage longer than a lease, a clock that is
wrong, a kernel that hangs. Real redis-server, real `shardgen worker` processes, real signals; every wait is on a
condition with a deadline, and a shard that must be seen running is held running."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.conftest import REPO, RedisServer, run_cli, run_status_now, wait_until, write_jsonl
from tests.test_distributed import make_rows, wait_for_end
from tests.test_faults import collect_exactly_once, submit
from tests.test_fleet import HELD, hold_file

FAULTY = "tests.faulty_generators"
FAST_LEASE = {"SHARDGEN_LEASE_SECONDS": "4"}


@pytest.fixture(autouse=True)
def fast_leases(monkeypatch):
    for key, value in FAST_LEASE.items():
        monkeypatch.setenv(key, value)


def test_a_sick_device_fails_its_attempts_not_the_rows_and_its_worker_stops(tmp_path, redis_url, tiny_model_dir,
                                                                            start_worker):
    """One of two workers has a GPU that raises a CUDA error on every call: its attempts fail (not the rows), the
    shards go to the healthy worker, the sick one stops itself and exits non-zero, and status says why."""
    model = str(tiny_model_dir)
    sick = start_worker(model, redis_url, "--engine", f"{FAULTY}:sick")
    sick.wait_ready()
    run_id = submit(write_jsonl(tmp_path / "q.jsonl", make_rows(48)), tmp_path / "work", redis_url, model,
                    "--shard-size", "8", "--max-new-tokens", "8")
    wait_until(lambda: sick.process.poll() is not None, timeout=120, what="the sick worker to stop itself")
    assert sick.process.returncode == 75
    start_worker(model, redis_url)
    status = wait_for_end(run_id, redis_url, timeout=300)
    assert status["state"] == "done" and status["rows_done"] == 48 and status["rows_failed"] == 0
    assert status["worker_faults"] == 3 and status["retries"] == 0 and status["shards_failed"] == 0
    (stopped,) = status["stopped_workers"]
    assert stopped["worker"].split(":")[1] == str(sick.process.pid)
    assert "sick: 3 attempts in a row" in stopped["reason"] and "illegal memory access" in stopped["reason"]
    shown = run_cli("status", run_id, "--broker", redis_url)
    assert "workers that stopped themselves" in shown.stdout and "sick" in shown.stdout
    collect_exactly_once(run_id, redis_url, tmp_path, 48)
    assert "illegal memory access" in sick.log_path.read_text(errors="replace")


def test_redis_paused_past_the_lease_reassigns_nothing(tmp_path, tiny_model_dir, start_worker, monkeypatch):
    """redis-server SIGSTOPped for three leases with a shard running on each of two workers, then SIGCONT: each
    worker takes its own lease back, no shard is reaped as a death, and the run ends with every row once."""
    server = RedisServer(tmp_path / "redis-data").start()
    try:
        model = str(tiny_model_dir)
        hold = hold_file(tmp_path, monkeypatch)
        workers = [start_worker(model, server.url, "--engine", HELD) for _ in range(2)]
        for worker in workers:
            worker.wait_ready()
        run_id = submit(write_jsonl(tmp_path / "q.jsonl", make_rows(32)), tmp_path / "work", server.url, model,
                        "--shard-size", "8", "--max-new-tokens", "8")
        wait_until(lambda: run_status_now(run_id, server.url)["shards_running"] == 2, timeout=60,
                   what="a shard running on each worker")
        server.process.send_signal(signal.SIGSTOP)
        time.sleep(3 * 4)  # the outage itself: three leases of 4 s, on Redis's clock as on ours
        server.process.send_signal(signal.SIGCONT)
        wait_until(lambda: run_status_now(run_id, server.url)["leases_taken_back"] == 2, timeout=60,
                   what="both workers to take their leases back")
        hold.unlink()
        status = wait_for_end(run_id, server.url, timeout=240)
        assert status["state"] == "done" and status["rows_done"] == 32
        assert status["reassigned"] == 0 and status["retries"] == 0 and status["worker_faults"] == 0
        collect_exactly_once(run_id, server.url, tmp_path, 32)
    finally:
        start_worker.stop_all()
        server.stop()


def test_a_worker_whose_clock_is_ten_minutes_fast_is_reaped_on_redis_time(tmp_path, redis_url, tiny_model_dir,
                                                                          start_worker, monkeypatch):
    """Leases are timed by Redis's clock: the shard of a killed worker whose clock runs ten minutes fast comes back
    within the lease, not ten minutes later."""
    model = str(tiny_model_dir)
    hold = hold_file(tmp_path, monkeypatch)
    monkeypatch.setenv("PYTHONPATH", str(REPO / "tests" / "skewed_clock"))
    monkeypatch.setenv("SHARDGEN_TEST_CLOCK_SKEW", "600")
    skewed = start_worker(model, redis_url, "--engine", HELD)
    monkeypatch.delenv("SHARDGEN_TEST_CLOCK_SKEW")
    monkeypatch.delenv("PYTHONPATH")
    skewed.wait_ready()
    run_id = submit(write_jsonl(tmp_path / "q.jsonl", make_rows(8)), tmp_path / "work", redis_url, model,
                    "--shard-size", "8", "--max-new-tokens", "8")
    status = wait_until(lambda: (s := run_status_now(run_id, redis_url))["shards_running"] == 1 and s, timeout=60,
                        what="the shard to start on the skewed worker")
    assert abs(status["workers"][0]["last_heartbeat_s_ago"]) < 30  # its heartbeats carry Redis's time too
    skewed.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    hold.unlink()
    start_worker(model, redis_url)
    status = wait_for_end(run_id, redis_url, timeout=240)
    assert status["state"] == "done" and status["reassigned"] == 1
    assert time.monotonic() - killed_at < 120  # a lease of 4 s, a worker start: far from the skew's 600 s
    collect_exactly_once(run_id, redis_url, tmp_path, 8)


def test_a_stalled_shard_is_given_up_and_its_worker_exits(tmp_path, redis_url, tiny_model_dir, start_worker):
    """A generator that blocks and never asks should_stop (a hung kernel): after --stall-seconds the worker hands
    the shard to another worker and exits non-zero, and status says why."""
    model = str(tiny_model_dir)
    hung = start_worker(model, redis_url, "--engine", f"{FAULTY}:blocking", "--stall-seconds", "3")
    hung.wait_ready()
    run_id = submit(write_jsonl(tmp_path / "q.jsonl", make_rows(16)), tmp_path / "work", redis_url, model,
                    "--shard-size", "8", "--max-new-tokens", "8")
    wait_until(lambda: hung.process.poll() is not None, timeout=60, what="the stalled worker to exit")
    assert hung.process.returncode == 75
    start_worker(model, redis_url)
    status = wait_for_end(run_id, redis_url, timeout=240)
    assert status["state"] == "done" and status["rows_done"] == 16 and status["worker_faults"] == 1
    assert status["retries"] == 0 and status["reassigned"] == 0
    (stopped,) = status["stopped_workers"]
    assert stopped["reason"].startswith("stalled: shard 0 of run") and "no progress for 3s" in stopped["reason"]
    collect_exactly_once(run_id, redis_url, tmp_path, 16)


def test_the_same_completion_sent_twice_to_a_real_redis_is_recorded_once(redis_url):
    """What redis-py does after a lost reply: the script is sent again. The second answer is `done` too, so the
    worker keeps (and publishes) its result instead of deleting it."""
    from shardgen.schemas.model import ModelSpec
    from shardgen.schemas.run import RunSpec
    from shardgen.workers.lifecycle import RunStore

    store = RunStore(redis_url)
    spec = RunSpec(input="in.jsonl", model=ModelSpec(model="tiny"), shard_size=4)
    store.create_run(spec, "/work", rows_total=4, shards_total=1)
    claim = store.claim_next(spec.model.queue, "w1")
    stats = dict(rows=4, rows_failed=0, prompt_tokens=12, generated_tokens=8, seconds=1.0)
    assert store.complete(claim, "obj", **stats) == "done" and store.complete(claim, "obj", **stats) == "done"
    record = store.record(spec.run_id)
    assert record.state.value == "done" and record.rows_done == 4 and record.generated_tokens == 8


def test_a_run_for_another_revision_reaches_only_workers_of_that_revision(tmp_path, redis_url, tiny_model_dir,
                                                                         start_worker):
    """A worker loaded at the default revision is live the whole run, and never takes a shard of a run submitted
    for revision v2; status says no live worker serves it, what the other worker differs in, and what to start."""
    import pyarrow.parquet as pq

    from shardgen.schemas.results import decode_metadata

    model = str(tiny_model_dir)
    other = start_worker(model, redis_url)
    other.wait_ready()
    run_id = submit(write_jsonl(tmp_path / "q.jsonl", make_rows(16)), tmp_path / "work", redis_url, model,
                    "--shard-size", "8", "--max-new-tokens", "4", "--model-revision", "v2")
    status = wait_until(lambda: (s := run_status_now(run_id, redis_url))["other_workers"] and s, timeout=60,
                        what="the default-revision worker to report")
    assert status["workers"] == [] and status["shards_queued"] == 2
    assert status["other_workers"][0]["differs"] == "revision none, the run wants v2"
    shown = run_cli("status", run_id, "--broker", redis_url).stdout
    words = " ".join(shown.split())  # the console wraps the suggested command at 80 columns
    assert "no live worker serves this run" in words and "--model-revision v2" in words
    matching = start_worker(model, redis_url, "--model-revision", "v2")
    status = wait_for_end(run_id, redis_url, timeout=240)
    assert status["state"] == "done" and status["rows_done"] == 16
    metadata = [decode_metadata(pq.read_schema(part).metadata) for part in (tmp_path / "work" / run_id).glob("part-*")]
    assert {m["worker"].split(":")[1] for m in metadata} == {str(matching.process.pid)}
    assert all(json.loads(m["model_identity"])["revision"] == "v2" for m in metadata)  # the result can tell
    assert other.process.poll() is None
    collect_exactly_once(run_id, redis_url, tmp_path, 16)
