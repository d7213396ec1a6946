"""The threads beside a worker's running shard: its lease renewal, and the worker-wide watchdog."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from shardgen.schemas.states import Outcome, RunState

from ..lifecycle import policy
from ..lifecycle.store import LEASE_MS, Claim, RunStore

log = logging.getLogger("shardgen.worker")


class Heartbeat:
    """Renews a running shard's lease, publishes how many of its rows are done, and notices when the shard
    must stop: the run was cancelled, or another attempt took the shard over (our lease is gone).

    `stop_reason` then says why ('cancelled' or 'lost'); `should_stop` also turns true once a shutdown's grace
    period has passed ('shutdown'). The engine asks `should_stop` between decode steps, so each question is
    progress, as each finished row is: with none for `stall_s` seconds the shard has stalled ('stalled'), and
    `on_stall` gives it up. The lease is renewed only while the shard progresses.
    """

    def __init__(self, store: RunStore, claim: Claim, *, lease_ms: int = LEASE_MS,
                 shutdown_deadline: Callable[[], float | None] = lambda: None,
                 stall_s: float | None = None, on_stall: Callable[[], None] = lambda: None):
        self.store, self.claim, self.lease_ms = store, claim, lease_ms
        self.interval_s = policy.heartbeat_interval(lease_ms)
        self.rows_done = 0
        self.stop_reason: str | None = None
        self.stall_s, self._on_stall = stall_s, on_stall
        self.last_progress = time.monotonic()
        self._shutdown_deadline = shutdown_deadline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="shardgen-heartbeat", daemon=True)

    def start(self) -> "Heartbeat":
        self._thread.start()
        return self

    def row_done(self, *_: object) -> None:
        self.rows_done += 1
        self.last_progress = time.monotonic()

    @property
    def stalled(self) -> bool:
        return bool(self.stall_s) and time.monotonic() - self.last_progress > self.stall_s  # type: ignore[operator]

    def should_stop(self) -> bool:
        self.last_progress = time.monotonic()
        if self.stop_reason is not None:
            return True
        deadline = self._shutdown_deadline()
        if deadline is not None and time.monotonic() >= deadline:
            self.stop_reason = "shutdown"
            return True
        return False

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def beat(self) -> None:
        """One renewal (the thread calls this every interval; tests call it directly)."""
        state = self.store.renew(self.claim, self.rows_done, self.lease_ms)
        if state is Outcome.LOST:
            log.warning("shard %s of run %s: another attempt took it over; stopping this one",
                        self.claim.shard_index, self.claim.run_id)
            self.stop_reason = "lost"
        elif state is RunState.CANCELLED:
            self.stop_reason = "cancelled"

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            if self.stalled:
                self.stop_reason = "stalled"
                self._on_stall()
                return
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - a Redis blip must not kill the shard; the next beat retries
                log.warning("lease renewal failed: %s", exc)


class Watchdog:
    """A worker-wide thread: reaps shards whose worker died, keeps wake-ups flowing, reports this worker live."""

    def __init__(self, tick: Callable[[], None], interval_s: float):
        self.tick, self.interval_s = tick, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="shardgen-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while True:
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001 - Redis may be restarting; try again next round
                log.warning("watchdog: %s", exc)
            if self._stop.wait(self.interval_s):
                return
