"""One run through everything a fleet does to it: workers SIGKILLed mid-shard at random points, a Redis restart, a
Redis pause past the lease, and a worker on a sick device. It ends with every row exactly once, and prints its
figures (run it with -s to see them)."""

from __future__ import annotations

import json
import random
import signal
import time

from tests.conftest import RedisServer, run_status_now, wait_until, write_jsonl
from tests.test_distributed import make_rows, wait_for_end
from tests.test_faults import collect_exactly_once, running_on, submit
from tests.test_worker_faults import FAST_LEASE, FAULTY, fast_leases  # noqa: F401 - the fixture, applied here too

ROWS, SHARD_SIZE = 360, 8
LEASE_S = float(FAST_LEASE["SHARDGEN_LEASE_SECONDS"])


def test_chaos_kills_a_restart_a_pause_and_a_sick_worker_lose_and_double_nothing(tmp_path, tiny_model_dir,
                                                                                start_worker):
    server = RedisServer(tmp_path / "redis-data").start()
    started = time.monotonic()
    try:
        url, model = server.url, str(tiny_model_dir)
        run_id = submit(write_jsonl(tmp_path / "q.jsonl", make_rows(ROWS)), tmp_path / "work", url, model,
                        "--shard-size", str(SHARD_SIZE), "--max-new-tokens", "32")
        sick = start_worker(model, url, "--engine", f"{FAULTY}:sick")
        workers = [start_worker(model, url), start_worker(model, url)]
        rng = random.Random(19)
        events = []

        def kill_one_mid_shard():
            victim = rng.choice(wait_until(lambda: [w for w in workers if w.ready()], timeout=180, what="a ready worker"))
            target = run_status_now(run_id, url)["shards_done"] + rng.randint(0, 2)
            status = wait_until(lambda: (s := run_status_now(run_id, url)) and
                                (s["state"] == "done" or (s["shards_done"] >= target and running_on(s, victim))) and s,
                                timeout=180, what="the victim to be mid-shard")
            assert status["state"] != "done", "the run ended before the chaos did: make the job longer"
            victim.kill(signal.SIGKILL)
            workers.remove(victim)
            workers.append(start_worker(model, url))
            events.append(f"SIGKILL mid-shard after {status['shards_done']} shards")

        kill_one_mid_shard()
        server.stop()  # Redis goes away with shards in flight, and comes back with its AOF
        server.start()
        events.append("Redis restarted")
        kill_one_mid_shard()
        wait_until(lambda: run_status_now(run_id, url)["shards_running"] >= 1, timeout=120, what="a shard running")
        server.process.send_signal(signal.SIGSTOP)
        time.sleep(3 * LEASE_S)  # the outage itself: three leases
        server.process.send_signal(signal.SIGCONT)
        events.append(f"Redis paused for {3 * LEASE_S:g}s (3 leases)")
        kill_one_mid_shard()
        status = wait_for_end(run_id, url, timeout=600)
        assert status["state"] == "done" and status["rows_done"] == ROWS and status["rows_failed"] == 0
        assert status["shards_done"] == ROWS // SHARD_SIZE and status["shards_failed"] == 0
        collect_exactly_once(run_id, url, tmp_path, ROWS)
        assert sick.process.poll() == 75 and status["worker_faults"] >= 3
        figures = {key: status[key] for key in ("rows_done", "shards_done", "reassigned", "retries", "worker_faults",
                                                "leases_taken_back", "storage_errors", "batch_halvings")}
        figures.update(kills=3, events=events, stopped_workers=[w["reason"][:60] for w in status["stopped_workers"]],
                       seconds=round(time.monotonic() - started, 1))
        print("CHAOS FIGURES " + json.dumps(figures))
    finally:
        start_worker.stop_all()
        server.stop()
