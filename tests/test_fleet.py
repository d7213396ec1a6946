"""Running a fleet: one command per node (supervised worker processes), graceful scale-down on SIGTERM,
Prometheus metrics, JSON logs, and status tables whose run ids survive a narrow terminal. Real redis-server,
real worker processes, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from shardgen.schemas.errors import InvalidParameter, ModelError
from shardgen.workers.queue.devices import claim_device, parse_devices
from tests.conftest import REPO, SHARDGEN, free_port, run_cli, run_status_now, wait_until, write_jsonl
from tests.test_distributed import make_rows, wait_for_end


HELD = "tests.held_generator:held"
"""A worker engine held at the start of each shard while the test's hold file exists (tests/held_generator.py)."""


def hold_file(tmp_path, monkeypatch):
    from tests.held_generator import HOLD_FILE_ENV

    hold = tmp_path / "hold"
    hold.touch()
    monkeypatch.setenv(HOLD_FILE_ENV, str(hold))
    return hold


def submit(data, work, broker, model, *extra):
    result = run_cli("submit", str(data), "--work-dir", str(work), "--broker", broker, "--model", model, "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["run_id"]


def scrape(port: int) -> dict[str, float]:
    """Samples of a /metrics page: name{labels} -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def serving(port: int) -> bool:
    try:
        scrape(port)
        return True
    except OSError:
        return False


class Process:
    def __init__(self, args, log_path, env=None):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.process = subprocess.Popen([*SHARDGEN, *args], stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO,
                                        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})})

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self.log.close()


@pytest.fixture()
def processes():
    started = []
    yield lambda *args, **kwargs: started.append(Process(*args, **kwargs)) or started[-1]
    for process in started:
        process.stop()


# ---------------------------------------------------------------- devices
def test_devices_name_one_worker_per_entry(monkeypatch):
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    assert parse_devices("0, 1,3") == ["0", "1", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert parse_devices("all") == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ModelError, match="found no GPU"):
        parse_devices("all")
    for bad in ("gpu0", "", "0;1"):
        with pytest.raises(InvalidParameter):
            parse_devices(bad)


def test_auto_device_never_stacks_two_workers_on_one_gpu(tmp_path, monkeypatch):
    """Each process takes the first GPU no other worker of this host holds (their locks live until they exit)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,7")
    script = ("import sys; from shardgen.workers.queue.devices import claim_device; "
              "from shardgen.schemas.errors import ShardgenError\n"
              "try: print(claim_device('auto'), flush=True)\nexcept ShardgenError as e: print(e.line(), flush=True)\n"
              "sys.stdin.read()")
    holders = []
    for _ in range(3):
        holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        holders.append((holder, holder.stdout.readline().strip()))
    try:
        assert [answer for _, answer in holders[:2]] == ["cuda:0", "cuda:1"]
        assert holders[2][1].startswith("every GPU of this host (4, 7) already has a shardgen worker")
    finally:
        for holder, _ in holders:
            holder.communicate("")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert claim_device("auto") == "cpu"


# ---------------------------------------------------------------- one command per node
def test_one_command_runs_a_supervised_worker_per_device(tmp_path, redis_url, tiny_model_dir, processes):
    model, port = str(tiny_model_dir), free_port()
    node = processes(["worker", "--devices", "cpu,cpu", "--model", model, "--broker", redis_url, "--batch-size", "4",
                      "--metrics-port", str(port), "--grace-seconds", "5"], tmp_path / "node.log")
    wait_until(lambda: serving(port) and serving(port + 1), timeout=180, what="both workers' metrics")
    run_id = submit(write_jsonl(tmp_path / "q.jsonl", make_rows(48)), tmp_path / "work", redis_url, model,
                    "--shard-size", "4", "--max-new-tokens", "8")
    assert wait_for_end(run_id, redis_url)["state"] == "done"
    done = [scrape(p).get('shardgen_shards_total{outcome="done"}', 0) for p in (port, port + 1)]
    assert sum(done) == 12 and all(count > 0 for count in done), done  # both devices took shards

    pids = {w["pid"] for w in run_status_now(run_id, redis_url)["workers"]}
    assert len(pids) == 2
    crashed = min(pids)
    os.kill(crashed, signal.SIGKILL)
    wait_until(lambda: "exited with code -9" in node.text() and
               len({w["pid"] for w in run_status_now(run_id, redis_url)["workers"]} - {crashed}) == 2,
               timeout=180, what="the crashed worker to be restarted")
    assert "restarting it in 1s (restart 1)" in node.text()

    node.process.send_signal(signal.SIGTERM)
    assert node.process.wait(60) == 0
    wait_until(lambda: not serving(port) and not serving(port + 1), timeout=30, what="the workers to exit")


# ---------------------------------------------------------------- graceful scale-down
def test_sigterm_mid_shard_gives_the_shard_back_in_seconds_not_after_the_lease(tmp_path, redis_url, tiny_model_dir, processes, monkeypatch):
    monkeypatch.setenv("SHARDGEN_LEASE_SECONDS", "120")  # a lease expiry would take two minutes
    hold = hold_file(tmp_path, monkeypatch)  # the shard runs until the signal, however fast this machine is
    model = str(tiny_model_dir)
    worker = processes(["worker", "--model", model, "--broker", redis_url, "--device", "cpu", "--batch-size", "2",
                        "--grace-seconds", "1", "--engine", HELD], tmp_path / "leaving.log")
    run_id = submit(write_jsonl(tmp_path / "q.jsonl", make_rows(8)), tmp_path / "work", redis_url, model,
                    "--shard-size", "8", "--max-new-tokens", "8")
    wait_until(lambda: run_status_now(run_id, redis_url)["shards_running"] == 1, timeout=120, what="the shard to start")
    worker.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    status = wait_until(lambda: (s := run_status_now(run_id, redis_url))["shards_queued"] == 1 and s, timeout=60,
                        what="the shard to be given back")
    assert time.monotonic() - signalled < 20
    assert status["reassigned"] == 0 and status["retries"] == 0 and status["shards_running"] == 0
    assert worker.process.wait(60) == 0
    assert "given back to its queue" in worker.text()

    hold.unlink()
    processes(["worker", "--model", model, "--broker", redis_url, "--device", "cpu", "--batch-size", "8"], tmp_path / "next.log")
    status = wait_for_end(run_id, redis_url, timeout=300)
    assert status["state"] == "done" and status["rows_done"] == 8


# ---------------------------------------------------------------- metrics and logs
def test_metrics_are_scraped_from_a_real_worker_during_a_run(tmp_path, redis_url, tiny_model_dir, processes, monkeypatch):
    hold = hold_file(tmp_path, monkeypatch)  # the first shard runs until the test has looked at it
    model, port = str(tiny_model_dir), free_port()
    processes(["worker", "--model", model, "--broker", redis_url, "--device", "cpu", "--batch-size", "4",
               "--metrics-port", str(port), "--engine", HELD], tmp_path / "worker.log")
    wait_until(lambda: serving(port), timeout=120, what="the metrics endpoint")
    before = scrape(port)
    assert before["shardgen_model_load_seconds"] > 0 and before["shardgen_busy"] == 0
    assert any(k.startswith("shardgen_worker_info{") and 'device="cpu"' in k for k in before)
    run_id = submit(write_jsonl(tmp_path / "q.jsonl", make_rows(20)), tmp_path / "work", redis_url, model,
                    "--shard-size", "4", "--max-new-tokens", "40")
    during = wait_until(lambda: (m := scrape(port)).get("shardgen_busy") == 1 and m, timeout=120, what="a running shard")
    assert any(k.startswith("shardgen_current_shard{") and f'run_id="{run_id}"' in k for k in during)
    hold.unlink()
    status = wait_for_end(run_id, redis_url)
    after = scrape(port)
    assert after['shardgen_shards_total{outcome="done"}'] == 5
    assert after["shardgen_rows_total"] == 20 and after["shardgen_generated_tokens_total"] == status["generated_tokens"]
    assert after["shardgen_prompt_tokens_total"] == status["prompt_tokens"]
    assert after["shardgen_tokens_per_second"] > 0 and 0 < after["shardgen_batch_occupancy"] <= 1
    assert after["shardgen_shard_seconds_count"] == 5 and after["shardgen_busy"] == 0
    assert not any(k.startswith("shardgen_current_shard{") for k in after)


def test_json_logs_carry_the_run_and_shard(tmp_path, redis_url, tiny_model_dir, processes):
    model = str(tiny_model_dir)
    worker = processes(["worker", "--model", model, "--broker", redis_url, "--device", "cpu", "--log-format", "json"],
                       tmp_path / "worker.log")
    run_id = submit(write_jsonl(tmp_path / "q.jsonl", make_rows(8)), tmp_path / "work", redis_url, model,
                    "--shard-size", "4", "--max-new-tokens", "2")
    wait_for_end(run_id, redis_url)
    wait_until(lambda: worker.text().count("done:") >= 2, timeout=30, what="the shard logs")
    lines = [line for line in worker.text().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    assert records and all({"time", "level", "logger", "message", "run_id", "shard"} <= set(r) for r in records)
    done = [r for r in records if r["message"].endswith("s") and " done: " in r["message"]]
    assert sorted((r["run_id"], r["shard"]) for r in done) == [(run_id, 0), (run_id, 1)]


def test_status_tables_keep_run_ids_whole_at_80_columns(tmp_path, redis_url, tiny_model_dir):
    data = write_jsonl(tmp_path / "q.jsonl", make_rows(4))
    run_id = submit(data, tmp_path / "work", redis_url, str(tiny_model_dir))
    narrow = {"COLUMNS": "80", "TERM": "xterm"}
    one = run_cli("status", run_id, "--broker", redis_url, env=narrow)
    listed = run_cli("status", "--broker", redis_url, env=narrow)
    for shown in (one, listed):
        assert shown.returncode == 0, shown.stderr
        assert any(run_id in line for line in shown.stdout.splitlines()), shown.stdout
        assert max(len(line) for line in shown.stdout.splitlines()) <= 80
