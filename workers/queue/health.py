"""Whether a worker should go on taking shards: its attempts keep failing by its own fault (a sick device), or
its running shard stalled. Either way it stops, says why in the run store (`status` lists it), and its process
exits with EXIT_STOPPED so that the supervisor, systemd or Kubernetes restarts it on a fresh device context.

The same signal feeds the liveness file: the watchdog touches it while the worker makes progress, so a process
hung past the reach of its own threads is restarted by the platform's probe (deploy/k8s/worker.yaml).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

from shardgen.schemas.runtime import DEFAULT_STALL_SECONDS
from shardgen.schemas.states import Fault

log = logging.getLogger("shardgen.worker")

SICK_AFTER = 3
"""Attempts in a row failed by the worker's own fault after which it stops taking shards."""
EXIT_STOPPED = 75
"""The exit status of a worker that stopped itself (EX_TEMPFAIL: restart me)."""
ALIVE_FILE_ENV = "SHARDGEN_ALIVE_FILE"
"""A file the worker touches on every watchdog round while it is healthy; the liveness probe checks its age."""


def _log_exit(code: int) -> None:
    log.error("a worker process would exit here with status %d", code)


class Health:
    def __init__(self, *, stall_s: float = DEFAULT_STALL_SECONDS, sick_after: int = SICK_AFTER,
                 alive_file: str | None = None, exit: Callable[[int], Any] = _log_exit,
                 request_exit: Callable[[], Any] = lambda: None):
        self.stall_s, self.sick_after = stall_s, sick_after
        self.alive_file = Path(alive_file) if alive_file else None
        self._exit, self.request_exit = exit, request_exit
        self.faults_in_a_row = 0
        self.stopped: str | None = None
        """Why this worker stopped itself, once it has."""
        self.heartbeat: Any = None
        """The running shard's Heartbeat (it knows when the shard last progressed), or None."""

    def attempt_ended(self, fault: Fault | None, error: str | None) -> bool:
        """Count an attempt that ended (`fault` None: it did not fail); True when this one stops the worker."""
        if fault is None:
            self.faults_in_a_row = 0
            return False
        if fault is not Fault.WORKER or self.stopped:
            return False
        self.faults_in_a_row += 1
        if self.faults_in_a_row < self.sick_after:
            return False
        self.stopped = f"sick: {self.faults_in_a_row} attempts in a row failed by this worker's fault; last: {error}"
        return True

    @property
    def healthy(self) -> bool:
        return self.stopped is None and not (self.heartbeat is not None and self.heartbeat.stalled)

    def report_alive(self) -> None:
        if self.alive_file is not None and self.healthy:
            self.alive_file.parent.mkdir(parents=True, exist_ok=True)
            self.alive_file.touch()

    def exit_stalled(self) -> None:
        """The thread that runs the shard hangs: no orderly shutdown can wait for it."""
        self._exit(EXIT_STOPPED)

    @classmethod
    def for_worker(cls, stall_s: float, request_exit: Callable[[], Any]) -> "Health":
        return cls(stall_s=stall_s, alive_file=os.environ.get(ALIVE_FILE_ENV) or None, exit=os._exit,
                   request_exit=request_exit)
