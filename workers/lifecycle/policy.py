"""The lifecycle's rules that are not a single transition: backoff, liveness, and whether a run may resume."""

from __future__ import annotations

from shardgen.schemas.errors import InvalidParameter
from shardgen.schemas.run import RunSpec

BACKOFF_BASE_S = 2.0
"""A failed shard waits 2, 4, 8 ... seconds before its next attempt (see scripts/fail.lua)."""
BACKOFF_CAP_S = 60.0
HEARTBEAT_S = 2.0
"""How often a worker renews the lease of its running shard and tells the store it is alive."""
WORKER_LIVE_S = 3 * HEARTBEAT_S + 4
"""A worker not heard from for this long is no longer listed as live (its watchdog reports every heartbeat)."""


def heartbeat_interval(lease_ms: int) -> float:
    """Renew several times per lease, so one slow renewal never lets a live shard's lease expire. The watchdog
    (reaping, wake-ups, the worker's own liveness) runs at the same pace."""
    return min(HEARTBEAT_S, lease_ms / 5000)


def retry_delay(failures: int) -> float:
    """Backoff before the next attempt after `failures` failed ones (the same formula as scripts/fail.lua)."""
    return min(BACKOFF_BASE_S * 2 ** (failures - 1), BACKOFF_CAP_S)


def check_resumable(previous: RunSpec, requested: RunSpec, where: str) -> None:
    """Refuse to resume `previous` with settings that would give different results, naming the first one."""
    difference = previous.difference(requested)
    if difference:
        raise InvalidParameter(
            f"cannot resume run {previous.run_id} ({where}) with a different {difference}",
            "resume with the original settings, or start a new run",
        )
