"""Large runs stay cheap: finished runs leave Redis (by expiry, or `shardgen gc` now), with their staged input on
request. Real redis-server, the real CLI. (`shardgen bench submit` measures cancel, retry and status at a million
shards, with the longest Redis command of each.)"""

from __future__ import annotations

import json

import redis

from tests.conftest import run_cli, write_jsonl
from tests.test_distributed import make_rows


def test_gc_removes_finished_runs_and_their_staged_input_and_never_a_live_one(tmp_path, redis_url):
    data = write_jsonl(tmp_path / "q.jsonl", make_rows(8))
    work = tmp_path / "work"
    runs = []
    for _ in range(2):
        result = run_cli("submit", str(data), "--work-dir", str(work), "--broker", redis_url, "--model", "m", "--json")
        assert result.returncode == 0, result.stderr
        runs.append(json.loads(result.stdout)["run_id"])
    ended, live = runs
    refused = run_cli("gc", live, "--broker", redis_url)
    assert refused.returncode != 0 and f"run {live} is queued" in refused.stderr
    assert run_cli("cancel", ended, "--broker", redis_url).returncode == 0
    assert redis.Redis.from_url(redis_url).ttl(f"sg:run:{ended}") > 0  # a finished run expires by itself
    assert "removed 0 finished run(s)" in run_cli("gc", "--broker", redis_url).stderr  # not a week old yet
    removed = run_cli("gc", "--older-than-days", "0", "--staged-input", "--broker", redis_url)
    assert removed.returncode == 0 and f"removed 1 finished run(s) and their staged input: {ended}" in removed.stderr
    assert not (work / ended / "input").exists() and (work / ended / "run.json").exists()
    assert (work / live / "input").exists()
    listed = run_cli("status", "--broker", redis_url).stdout
    assert live in listed and ended not in listed
