"""Faults a real fleet has beyond a killed worker: a sick device, an outage longer than a lease, a clock that is
wrong, a kernel that hangs. Real redis-server, real `shardgen worker` processes, real signals; every wait is on a
condition with a deadline, and a shard that must be seen running is held running."""

from __future__ import annotations

import signal
import time

import pytest

from tests.conftest import RedisServer, run_cli, run_status_now, wait_until, write_jsonl
from tests.test_distributed import make_rows, wait_for_end
from tests.test_faults import collect_exactly_once, submit
from tests.test_fleet import HELD, hold_file

SICK = "tests.sick_generator:sick"
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
    sick = start_worker(model, redis_url, "--engine", SICK)
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
