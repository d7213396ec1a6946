"""Redis failover: a primary, a replica and a Sentinel, all real redis-server processes; the broker URL names the
Sentinels in kombu's form (sentinel://host:port;sentinel://host:port) for redis-py and Celery alike. The primary
is killed mid-run; the Sentinel promotes the replica, every command and worker follows it, and the run ends with
every row exactly once."""

from __future__ import annotations

import shutil
import socket
import subprocess

import redis

from tests.conftest import RedisServer, free_port, run_cli, run_status_now, wait_until, write_jsonl
from tests.test_distributed import make_rows, wait_for_end
from tests.test_faults import collect_exactly_once, submit
from tests.test_fleet import HELD, hold_file

MASTER = "shardgen"


class Sentinel:
    def __init__(self, directory, primary_port: int):
        self.port = free_port()
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "sentinel.conf"
        config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {directory}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {primary_port} 1\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 10000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        self.process = subprocess.Popen([shutil.which("redis-server"), str(config), "--sentinel"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: _listening(self.port), timeout=10, what="the Sentinel to listen")

    def master_port(self) -> int:
        host, port = redis.Redis(port=self.port).sentinel_get_master_addr_by_name(MASTER)
        return int(port)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def test_the_primary_killed_mid_run_fails_over_and_every_row_is_generated_once(tmp_path, tiny_model_dir, start_worker,
                                                                              monkeypatch):
    primary = RedisServer(tmp_path / "primary").start()
    replica = RedisServer(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port)).start()
    wait_until(lambda: redis.Redis(port=replica.port).info("replication")["master_link_status"] == "up", timeout=30,
               what="the replica to sync")
    sentinel = Sentinel(tmp_path / "sentinel", primary.port)
    try:
        wait_until(lambda: redis.Redis(port=sentinel.port).sentinel_master(MASTER)["num-slaves"] >= 1, timeout=30,
                   what="the Sentinel to see the replica")
        monkeypatch.setenv("SHARDGEN_SENTINEL_MASTER", MASTER)
        dead = free_port()  # a Sentinel that is down: the next one in the list answers
        url = f"sentinel://127.0.0.1:{dead}/0;sentinel://127.0.0.1:{sentinel.port}/0"
        model = str(tiny_model_dir)
        hold = hold_file(tmp_path, monkeypatch)  # both workers hold a shard running while the primary dies
        run_id = submit(write_jsonl(tmp_path / "q.jsonl", make_rows(96)), tmp_path / "work", url, model,
                        "--shard-size", "8", "--max-new-tokens", "24")
        workers = [start_worker(model, url, "--engine", HELD) for _ in range(2)]
        wait_until(lambda: run_status_now(run_id, url)["shards_running"] == 2, timeout=240,
                   what="a shard running on each worker")
        primary.process.kill()  # the node is gone; its AOF with it
        primary.process.wait(10)
        wait_until(lambda: sentinel.master_port() == replica.port, timeout=60, what="the replica to be promoted")
        hold.unlink()
        status = wait_for_end(run_id, url, timeout=300)
        assert status["state"] == "done" and status["rows_done"] == 96 and status["shards_failed"] == 0
        collect_exactly_once(run_id, url, tmp_path, 96)
        assert all(w.process.poll() is None for w in workers)  # they followed the failover; none had to restart
        shown = run_cli("status", run_id, "--broker", url)
        assert shown.returncode == 0 and "done" in shown.stdout
    finally:
        start_worker.stop_all()
        sentinel.stop()
        replica.stop()
        primary.stop()


def test_sentinel_urls_name_each_sentinel_need_a_master_and_never_show_the_password(monkeypatch):
    import pytest

    from shardgen.schemas.errors import BrokerError
    from shardgen.workers.redis_conn import broker_url, redact, sentinels

    url = "sentinel://:s3cret@a:26379/0;sentinel://b:26380;sentinel://c"
    assert sentinels(url) == [("a", 26379), ("b", 26380), ("c", 26379)]
    assert "s3cret" not in redact(url) and redact(url).count("sentinel://") == 3
    monkeypatch.delenv("SHARDGEN_SENTINEL_MASTER", raising=False)
    with pytest.raises(BrokerError, match="SHARDGEN_SENTINEL_MASTER or pass --sentinel-master"):
        broker_url(url)
    monkeypatch.setenv("SHARDGEN_SENTINEL_MASTER", MASTER)
    assert broker_url(url) == url
    with pytest.raises(BrokerError, match="is not a Sentinel address"):
        broker_url("sentinel://a:1;redis://b:2")
