"""Workers die, Redis restarts, shards fail, users cancel: nothing is lost, nothing is doubled.

Real redis-server, real `shardgen worker` processes, the real CLI. Every wait is on a condition, with a deadline.
"""

import json
import random
import shutil
import signal
import time

import pyarrow.parquet as pq
import pytest

from tests.conftest import RedisServer, run_cli, run_status_now, wait_until, write_jsonl
from tests.test_distributed import make_rows, wait_for_end
from tests.test_fleet import HELD, hold_file

FAST_LEASE = {"SHARDGEN_LEASE_SECONDS": "4"}


@pytest.fixture(autouse=True)
def fast_leases(monkeypatch):
    for key, value in FAST_LEASE.items():
        monkeypatch.setenv(key, value)


def submit(data, work, broker, model, *extra):
    result = run_cli("submit", str(data), "--work-dir", str(work), "--broker", broker, "--model", model, "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["run_id"]


def status_of(run_id, broker):
    return run_status_now(run_id, broker)


def collect_exactly_once(run_id, broker, tmp_path, rows):
    out = tmp_path / f"{run_id}.parquet"
    result = run_cli("collect", run_id, "-o", str(out), "--broker", broker)
    assert result.returncode == 0, result.stderr
    table = pq.read_table(out).to_pylist()
    assert [r["row_index"] for r in table] == list(range(rows))
    assert all(r["error"] is None for r in table)
    return table


def running_on(status, worker):
    """Whether `worker` (a WorkerProcess) is running a shard, per the live workers `status` lists."""
    return any(w["pid"] == worker.process.pid and w["shard_index"] is not None for w in status.get("workers", []))


def test_chaos_random_kills_and_a_redis_restart_lose_and_double_nothing(tmp_path, tiny_model_dir, start_worker):
    """Workers SIGKILLed mid-shard at random points, and Redis (AOF on) restarted once, during one run."""
    server = RedisServer(tmp_path / "redis-data").start()
    try:
        url = server.url
        model = str(tiny_model_dir)
        data = write_jsonl(tmp_path / "q.jsonl", make_rows(240))
        run_id = submit(data, tmp_path / "work", url, model, "--shard-size", "8", "--max-new-tokens", "48")
        workers = [start_worker(model, url), start_worker(model, url)]
        rng = random.Random(7)
        kills = 0
        while kills < 3:
            victim = rng.choice(wait_until(lambda: [w for w in workers if w.ready()], timeout=180, what="a ready worker"))
            # Kill it in the middle of a shard, after a random number of further shards finished.
            target = status_of(run_id, url)["shards_done"] + rng.randint(0, 1)
            status = wait_until(lambda: (s := status_of(run_id, url)) and
                                (s["state"] == "done" or (s["shards_done"] >= target and running_on(s, victim))) and s,
                                timeout=180, what="the victim to be mid-shard")
            if status["state"] == "done":
                break
            victim.kill(signal.SIGKILL)
            kills += 1
            workers.remove(victim)
            workers.append(start_worker(model, url))
            if kills == 1:
                server.stop()  # Redis goes away with a shard in flight on the other worker, and comes back
                server.start()
        status = wait_for_end(run_id, url, timeout=300)
        assert status["state"] == "done" and status["rows_done"] == 240 and status["shards_done"] == 30
        assert kills == 3, "the run ended before three workers could be killed mid-shard: make the job longer"
        assert status["reassigned"] >= 1
        collect_exactly_once(run_id, url, tmp_path, 240)
    finally:
        start_worker.stop_all()
        server.stop()


def test_a_killed_workers_shard_is_taken_over_within_the_lease(tmp_path, redis_url, tiny_model_dir, start_worker,
                                                              monkeypatch):
    model = str(tiny_model_dir)
    data = write_jsonl(tmp_path / "q.jsonl", make_rows(16))
    hold = hold_file(tmp_path, monkeypatch)  # the shard is still running when the worker is killed
    doomed = start_worker(model, redis_url, "--engine", HELD)
    doomed.wait_ready()
    run_id = submit(data, tmp_path / "work", redis_url, model, "--shard-size", "16", "--max-new-tokens", "16")
    wait_until(lambda: status_of(run_id, redis_url)["shards_running"] == 1, timeout=60, what="the shard to start")
    doomed.kill(signal.SIGKILL)
    killed_at = time.time()
    hold.unlink()
    start_worker(model, redis_url, "--batch-size", "16")
    status = wait_for_end(run_id, redis_url, timeout=240)
    assert status["state"] == "done" and status["reassigned"] == 1
    assert time.time() - killed_at < 120
    collect_exactly_once(run_id, redis_url, tmp_path, 16)


def test_redis_restart_mid_run_loses_no_state(tmp_path, tiny_model_dir, start_worker):
    server = RedisServer(tmp_path / "redis-data").start()
    try:
        model = str(tiny_model_dir)
        data = write_jsonl(tmp_path / "q.jsonl", make_rows(96))
        worker = start_worker(model, server.url)
        worker.wait_ready()
        run_id = submit(data, tmp_path / "work", server.url, model, "--shard-size", "8", "--max-new-tokens", "16")
        wait_until(lambda: status_of(run_id, server.url)["shards_done"] >= 2, timeout=120, what="two shards done")
        server.stop()
        server.start()
        status = wait_for_end(run_id, server.url, timeout=300)
        assert status["state"] == "done" and status["rows_done"] == 96
        collect_exactly_once(run_id, server.url, tmp_path, 96)
    finally:
        start_worker.stop_all()
        server.stop()


def test_failed_shards_are_retried_with_backoff_then_marked_failed_and_retry_recovers(tmp_path, redis_url, tiny_model_dir, start_worker):
    model = str(tiny_model_dir)
    data = write_jsonl(tmp_path / "q.jsonl", make_rows(12))
    work = tmp_path / "work"
    run_id = submit(data, work, redis_url, model, "--shard-size", "6", "--max-new-tokens", "4", "--max-retries", "1")
    staged = work / run_id / "input"
    shutil.move(staged, tmp_path / "input-aside")  # every attempt now fails to read its shard
    start_worker(model, redis_url)
    status = wait_for_end(run_id, redis_url, timeout=120)
    assert status["state"] == "failed" and status["shards_failed"] == 2 and status["retries"] == 2
    assert all(f["attempts"] == 2 and "does not exist" in f["error"] for f in status["failed_shards"])
    table = run_cli("status", run_id, "--broker", redis_url).stdout
    assert "failed shards" in table

    incomplete = run_cli("collect", run_id, "-o", str(tmp_path / "x.parquet"), "--broker", redis_url)
    assert incomplete.returncode == 3 and f"run {run_id} is incomplete: 12 row(s) missing" in incomplete.stderr
    assert not (tmp_path / "x.parquet").exists()

    shutil.move(tmp_path / "input-aside", staged)
    retried = run_cli("retry", run_id, "--broker", redis_url)
    assert retried.returncode == 0 and "queued 2 shard(s)" in retried.stderr
    status = wait_for_end(run_id, redis_url, timeout=120)
    assert status["state"] == "done" and status["shards_failed"] == 0 and status["rows_done"] == 12
    collect_exactly_once(run_id, redis_url, tmp_path, 12)


def test_cancel_stops_the_run_and_retry_finishes_it(tmp_path, redis_url, tiny_model_dir, start_worker):
    model = str(tiny_model_dir)
    data = write_jsonl(tmp_path / "q.jsonl", make_rows(64))
    run_id = submit(data, tmp_path / "work", redis_url, model, "--shard-size", "8", "--max-new-tokens", "64")
    start_worker(model, redis_url)
    wait_until(lambda: status_of(run_id, redis_url)["shards_done"] >= 1, timeout=120, what="a shard done")
    cancelled = run_cli("cancel", run_id, "--broker", redis_url)
    assert cancelled.returncode == 0, cancelled.stderr
    status = wait_until(lambda: (s := status_of(run_id, redis_url))["shards_running"] == 0 and s, timeout=30,
                        what="the running shard to stop")
    assert status["state"] == "cancelled" and status["shards_done"] < 8
    assert status["shards_done"] + status["shards_cancelled"] == 8
    again = run_cli("cancel", run_id, "--broker", redis_url)
    assert again.returncode != 0 and "already ended" in again.stderr
    assert run_cli("retry", run_id, "--broker", redis_url).returncode == 0
    status = wait_for_end(run_id, redis_url, timeout=240)
    assert status["state"] == "done"
    collect_exactly_once(run_id, redis_url, tmp_path, 64)


def test_resume_redoes_only_missing_shards_and_refuses_different_settings(tmp_path, redis_url, tiny_model_dir, start_worker):
    model = str(tiny_model_dir)
    data = write_jsonl(tmp_path / "q.jsonl", make_rows(24))
    work = tmp_path / "work"
    common = ["--shard-size", "8", "--max-new-tokens", "4"]
    run_id = submit(data, work, redis_url, model, *common)
    start_worker(model, redis_url)
    assert wait_for_end(run_id, redis_url)["state"] == "done"
    kept = work / run_id / "part-00000.parquet"
    kept_bytes = kept.read_bytes()
    (work / run_id / "part-00001.parquet").unlink()

    refused = run_cli("submit", str(data), "--work-dir", str(work), "--broker", redis_url, "--model", model, *common,
                      "--temperature", "0.5", "--resume", run_id)
    assert refused.returncode != 0 and "generation parameters" in refused.stderr and "Traceback" not in refused.stderr

    resumed = run_cli("submit", str(data), "--work-dir", str(work), "--broker", redis_url, "--model", model, *common, "--resume", run_id)
    assert resumed.returncode == 0 and "1 of 3 shard(s) queued again" in resumed.stderr
    assert wait_for_end(run_id, redis_url)["state"] == "done"
    assert kept.read_bytes() == kept_bytes
    collect_exactly_once(run_id, redis_url, tmp_path, 24)


def test_malformed_and_foreign_messages_are_rejected_not_executed(tmp_path, redis_url, tiny_model_dir, start_worker):
    from celery import Celery

    from shardgen.schemas.model import ModelSpec
    from shardgen.workers.queue.celery_app import TASK_NAME, wake_queue

    model = str(tiny_model_dir)
    queue = wake_queue(ModelSpec(model=model).queue)
    marker = tmp_path / "pwned"
    sender = Celery("attacker", broker=redis_url)
    sender.conf.accept_content = ["json", "pickle"]
    sender.send_task(TASK_NAME, args=[{"queue": ModelSpec(model=model).queue}], queue=queue, serializer="pickle")
    sender.send_task(TASK_NAME, args=[{"queue": "../../etc"}], queue=queue)
    sender.send_task(TASK_NAME, args=["not a message"], queue=queue)
    sender.send_task("celery.backend_cleanup", queue=queue)
    sender.send_task("os.system", args=[f"touch {marker}"], queue=queue)
    worker = start_worker(model, redis_url)
    worker.wait_ready()
    data = write_jsonl(tmp_path / "q.jsonl", make_rows(8))
    run_id = submit(data, tmp_path / "work", redis_url, model, "--shard-size", "4", "--max-new-tokens", "4")
    assert wait_for_end(run_id, redis_url)["state"] == "done"
    log = worker.log_path.read_text(errors="replace")
    assert "pickle" in log and "rejected message (not executed)" in log and "invalid queue" in log
    assert not marker.exists()
    assert worker.process.poll() is None
