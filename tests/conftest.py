"""Shared fixtures: a real redis-server of our own, a tiny random model, `shardgen worker` subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.tiny_model import build_tiny_model

REPO = Path(__file__).resolve().parent.parent
SHARDGEN = [sys.executable, "-m", "shardgen.producer.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server process on a free port, with its data in a temp dir (AOF on, so restarts keep state)."""

    def __init__(self, directory: Path, *extra: str, tls: bool = False):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(
                "redis-server is not installed: the integration tests start their own. "
                "Install it (Debian/Ubuntu: `apt-get install redis-server`, macOS: `brew install redis`) and rerun `make test`.",
                pytrace=False,
            )
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.extra = extra
        self.tls = tls
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def port_args(self) -> list[str]:
        return ["--port", "0", "--tls-port", str(self.port)] if self.tls else ["--port", str(self.port)]

    def start(self) -> "RedisServer":
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [self.binary, *self.port_args(), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--save", "", "--appendonly", "yes", "--appendfsync", "always", *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture()
def redis_url(redis_server: RedisServer) -> str:
    import redis

    redis.Redis.from_url(redis_server.url).flushall()
    return redis_server.url


class S3Server:
    """moto's S3 API server in a subprocess on 127.0.0.1 and a free port (as s3fs's own tests run it)."""

    def __init__(self, directory: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(directory / "moto.log", "wb")
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("moto_server did not start")

    def env(self, **overrides: str) -> dict[str, str]:
        """What a user sets to reach this store: the standard AWS variables and AWS_ENDPOINT_URL."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true", **overrides}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": self.endpoint})

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)
        self.log.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture()
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The S3 server, with this process and every subprocess (CLI, workers) pointed at it."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir: Path):
    from shardgen.schemas.model import ModelSpec
    from shardgen.workers.models.loader import load_model

    return load_model(ModelSpec(model=str(tiny_model_dir)), "cpu")


@pytest.fixture(scope="session")
def tiny_reference(tiny_model_dir: Path):
    """A second copy of the tiny model that no engine packs: what plain transformers computes."""
    from shardgen.schemas.model import ModelSpec
    from shardgen.workers.models.loader import load_model

    return load_model(ModelSpec(model=str(tiny_model_dir)), "cpu")


@pytest.fixture(scope="session")
def real_loaded():
    """The real default model, loaded once per session."""
    from shardgen.schemas.model import ModelSpec
    from shardgen.workers.models.loader import load_model

    return load_model(ModelSpec(), "cpu")


def wait_until(condition, *, timeout: float, what: str, interval: float = 0.2):
    """Poll `condition` until it returns something true (returned), or fail after `timeout` seconds."""
    deadline = time.time() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def run_status_now(run_id: str, broker: str) -> dict:
    """A run's status as `status --json` computes it, read in process (fast enough to poll)."""
    from shardgen.workers.lifecycle import RunStore, current_status

    return current_status(RunStore(broker), run_id)


class EngineWrapper:
    """A generator that hands everything to a real engine; tests subclass it to change one behaviour."""

    def __init__(self, engine):
        self.engine, self.name = engine, engine.name

    @property
    def batch_size(self):
        return self.engine.batch_size

    @batch_size.setter
    def batch_size(self, value):
        self.engine.batch_size = value

    @property
    def auto_batch(self):
        return self.engine.auto_batch

    def generate(self, requests, params, *, on_output=None, should_stop=None):
        return self.engine.generate(requests, params, on_output=on_output, should_stop=should_stop)


def chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real `shardgen` command in a subprocess."""
    return subprocess.run(
        [*SHARDGEN, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}, cwd=REPO
    )


class WorkerProcess:
    def __init__(self, model: str, broker: str, log_path: Path, *extra: str):
        # A short grace: a worker stopped at teardown gives its shard back instead of finishing it.
        self.args = [*SHARDGEN, "worker", "--model", model, "--device", "cpu", "--broker", broker, "--batch-size", "8",
                     "--grace-seconds", "1", *extra]
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        self.log = open(self.log_path, "ab")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        return self

    def ready(self) -> bool:
        return self.log_path.read_bytes().find(b" ready.") >= 0

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.log_path.read_bytes().find(b" ready.") >= 0:
                return
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"worker not ready:\n{self.log_path.read_text(errors='replace')[-3000:]}")

    def kill(self, sig: int = 9) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()


class WorkerStarter:
    """`start_worker(model, broker, *flags)` starts a real `shardgen worker`; all are stopped at teardown."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.started: list[WorkerProcess] = []

    def __call__(self, model: str, broker: str, *extra: str) -> WorkerProcess:
        worker = WorkerProcess(model, broker, self.directory / f"worker-{len(self.started)}.log", *extra).start()
        self.started.append(worker)
        return worker

    def stop_all(self) -> None:
        """SIGTERM to every worker at once, then wait for each: they drain in parallel, not one after another.
        Call it before stopping a test's own Redis, so that workers do not spend their shutdown reconnecting."""
        for worker in self.started:
            if worker.process and worker.process.poll() is None:
                worker.process.terminate()
        for worker in self.started:
            worker.stop()


@pytest.fixture()
def start_worker(tmp_path: Path):
    starter = WorkerStarter(tmp_path)
    yield starter
    starter.stop_all()


def run_in_fresh_process(source: str, timeout: float = 300) -> None:
    """Run `source` (with its asserts) in a new interpreter: what a process's memory looks like must not depend on
    which tests ran before in this one (their freed heap, their threads, their mapped files)."""
    import textwrap

    result = subprocess.run([sys.executable, "-c", textwrap.dedent(source)], capture_output=True, text=True,
                            timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
