"""The deploy recipes, checked without Docker: they parse, and the commands they run are valid shardgen commands."""

import configparser
import shlex
import subprocess
import time

import click
import redis
import yaml

from shardgen.producer.cli import cli
from tests.conftest import REPO, free_port

DEPLOY = REPO / "deploy"


def assert_valid_shardgen_command(args):
    command = cli.get_command(click.Context(cli), args[0])
    assert command is not None, args
    command.make_context(args[0], list(args[1:]))  # raises on unknown options or bad values


def test_compose_services_run_valid_worker_commands_with_aof_redis():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert "redis" in services and "redis.conf" in " ".join(services["redis"]["command"])
    workers = [s for name, s in services.items() if name.startswith("worker")]
    assert len(workers) >= 2
    for worker in workers:
        assert_valid_shardgen_command(worker["command"])
        assert worker["environment"]["SHARDGEN_BROKER_URL"].startswith("redis://")
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["shardgen"]' in dockerfile and "COPY workers workers" in dockerfile


def test_systemd_unit_runs_a_valid_worker_command():
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.read(DEPLOY / "systemd" / "shardgen-worker@.service")
    exec_start = shlex.split(unit["Service"]["ExecStart"])
    env = dict(line.split("=", 1) for line in (DEPLOY / "systemd" / "shardgen.env").read_text().splitlines() if line)
    args = [a.replace("${SHARDGEN_MODEL}", env["SHARDGEN_MODEL"]).replace("${SHARDGEN_BATCH_SIZE}", env["SHARDGEN_BATCH_SIZE"]).replace("%i", "0")
            for a in exec_start[1:]]
    assert exec_start[0].endswith("/shardgen")
    assert_valid_shardgen_command(args)


def test_redis_conf_starts_a_server_with_aof_on(tmp_path):
    port = free_port()
    conf = tmp_path / "redis.conf"  # the recipe's `dir /data` must exist when the file is read
    conf.write_text((DEPLOY / "redis.conf").read_text().replace("dir /data", f"dir {tmp_path}"))
    server = subprocess.Popen(["redis-server", str(conf), "--port", str(port), "--bind", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port, password="change-me", socket_timeout=2, socket_connect_timeout=2)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    finally:
        server.terminate()
        server.wait(10)
