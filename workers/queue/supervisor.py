"""`shardgen worker --devices ...`: one worker process per device on this node, supervised.

Each child is a worker process (worker_main.py) started from the node's WorkerConfig, pinned to its GPU with
CUDA_VISIBLE_DEVICES before torch starts (this process never imports torch). A child that exits on its own is restarted with a growing
delay and the parent says so; SIGTERM or SIGINT is passed to every child, which gives its running shard back
after its grace period, and the parent waits for them before it exits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from shardgen.schemas.errors import InvalidParameter

from .config import CONFIG_ENV, WorkerConfig

log = logging.getLogger("shardgen.supervisor")

RESTART_DELAYS = (1, 2, 5, 10, 30, 60)
STABLE_AFTER_S = 60.0
"""A child that ran this long before exiting starts its restarts from the shortest delay again."""


@dataclass
class Child:
    slot: int
    device: str
    """A GPU id of this host, or cpu."""
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    next_start: float = 0.0
    delays: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        where = "cpu" if self.device == "cpu" else ("GPUs " if "," in self.device else "GPU ") + self.device
        return f"worker {self.slot} ({where})"

    def start(self) -> None:
        # Its own session: a terminal's Ctrl-C reaches the supervisor only, which then stops every child the
        # same way; and if the supervisor dies, the kernel sends the child SIGTERM (Linux).
        self.process = subprocess.Popen(self.command, env=self.env, start_new_session=True, preexec_fn=_term_with_parent)
        self.started_at = time.monotonic()
        log.warning("%s started, pid %d", self.name, self.process.pid)


def _term_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def device_groups(devices: list[str], per_worker: int) -> list[str]:
    """The devices of each worker: one GPU id each, or `per_worker` of them joined (`0,1`) for tensor parallelism."""
    if per_worker == 1:
        return devices
    if "cpu" in devices:
        raise InvalidParameter(f"--gpus-per-worker {per_worker} needs GPUs, and --devices names cpu",
                               "use --devices all or GPU ids, or leave --gpus-per-worker at 1")
    if len(devices) % per_worker:
        raise InvalidParameter(f"{len(devices)} GPUs ({','.join(devices)}) do not split into workers of {per_worker}",
                               f"name a multiple of {per_worker} GPUs with --devices")
    return [",".join(devices[i : i + per_worker]) for i in range(0, len(devices), per_worker)]


def child_commands(devices: list[str], config: WorkerConfig, base_env: dict[str, str]) -> list[Child]:
    """The command and environment of each device's worker: pinned (to --gpus-per-worker GPUs each), with its own
    metrics port and name."""
    children = []
    for slot, device in enumerate(device_groups(devices, config.runtime.gpus_per_worker)):
        env = dict(base_env)
        env["CUDA_VISIBLE_DEVICES"] = "" if device == "cpu" else device
        label = "cpu" if device == "cpu" else f"gpu{device.replace(',', '-')}"
        child = config.for_child(slot, "cpu" if device == "cpu" else "cuda:0", label)
        env[CONFIG_ENV] = child.to_json()
        children.append(Child(slot, device, [sys.executable, "-m", "shardgen.workers.queue.worker_main"], env))
    return children


class Supervisor:
    def __init__(self, children: list[Child], grace_s: float, clock: Callable[[], float] = time.monotonic):
        self.children, self.grace_s, self.clock = children, grace_s, clock
        self.stopping = False

    def request_stop(self, *_: object) -> None:
        self.stopping = True

    def run(self, poll_s: float = 0.5) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        for child in self.children:
            child.start()
        while not self.stopping:
            self.check(self.clock())
            time.sleep(poll_s)
        return self.stop()

    def check(self, now: float) -> None:
        """Restart children that exited, each after its delay."""
        for child in self.children:
            if child.process is None:
                if now >= child.next_start:
                    child.start()
                continue
            code = child.process.poll()
            if code is None:
                continue
            ran = now - child.started_at
            if ran >= STABLE_AFTER_S:
                child.delays = []
            delay = RESTART_DELAYS[min(len(child.delays), len(RESTART_DELAYS) - 1)]
            child.delays.append(delay)
            child.restarts += 1
            child.process = None
            child.next_start = now + delay
            log.error("%s exited with code %s after %.0fs; restarting it in %ds (restart %d)",
                      child.name, code, ran, delay, child.restarts)

    def stop(self) -> int:
        """SIGTERM every child, wait for their grace period (and a margin), then kill what is left."""
        running = [c for c in self.children if c.process is not None and c.process.poll() is None]
        log.warning("stopping %d worker(s): each gives its running shard back within %.0fs", len(running), self.grace_s)
        for child in running:
            child.process.send_signal(signal.SIGTERM)
        deadline = self.clock() + self.grace_s + 15
        for child in running:
            try:
                child.process.wait(timeout=max(0.1, deadline - self.clock()))
            except subprocess.TimeoutExpired:
                log.error("%s did not stop in time; killing it", child.name)
                child.process.kill()
                child.process.wait()
        return 0


def supervise(devices: list[str], config: WorkerConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    children = child_commands(devices, config, dict(os.environ))
    log.warning("supervising %d worker(s) on %s", len(children), ", ".join(c.device for c in children))
    return Supervisor(children, config.runtime.grace_seconds).run()
