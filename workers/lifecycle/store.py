"""The run store: every run's and shard's state in Redis, moved only by the atomic scripts in scripts/.

Keys (prefix `sg`):
  sg:runs                   zset   run id -> created time
  sg:run:{id}               hash   spec (JSON), state, work_dir, queue, sizes, per-state shard counters, totals
  sg:run:{id}:shards        hash   shard index -> JSON record; a shard never claimed has none (queued, attempt 1)
  sg:run:{id}:running       set    indices of running shards     sg:run:{id}:failed   set   of failed ones
  sg:lease:{id}:{i}         string the worker running shard i, with a TTL its heartbeat renews
  sg:leases                 zset   run|i -> lease expiry (ms), so a reaper finds expired leases quickly
  sg.q.{model}              list   run|i|attempt: the shards waiting for a worker of that model (FIFO)
  sg:delayed:sg.q.{model}   zset   run|i|attempt -> when a failed shard's backoff ends
  sg:workers                hash   worker id -> JSON (queue, device, host, current shard, last heartbeat)
  sg:stopped                hash   worker id -> JSON: a worker that stopped itself (sick, stalled) and why
  sg:seen                   string when a watchdog last reaped (Redis time): a long silence is an outage

A shard is always in exactly one place: an entry in its queue (or its backoff set), or a lease, or ended.
Each transition moves it in one script, so no crash between two calls can leave a shard that nothing moves.
Redis holds metadata only; a run's rows are staged in its work directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field, fields
from importlib import resources
from typing import Any, Callable, Iterable

from shardgen.schemas.errors import RunNotFound
from shardgen.schemas.run import RunSpec
from shardgen.schemas.shard import check_run_id
from shardgen.schemas.states import Fault, Outcome, RunState, ShardState

from . import policy

log = logging.getLogger("shardgen.worker")

PREFIX = "sg"
LEASE_MS = int(float(os.environ.get("SHARDGEN_LEASE_SECONDS", "30")) * 1000)
"""How long a running shard's lease lasts unless renewed; a worker renews it every few seconds."""
QUIET_MS = max(LEASE_MS // 2, 1000)
"""When no worker has renewed or reaped for this long, Redis (or the whole fleet) was away: leases that ran out
meanwhile get one more lease before they are reaped (scripts/reap.lua)."""
STORAGE_PATIENCE_S = float(os.environ.get("SHARDGEN_STORAGE_PATIENCE_SECONDS", "900"))
"""How long a shard's storage errors in a row are retried with backoff before they spend its retries."""
REDIS_PATIENCE_S = float(os.environ.get("SHARDGEN_REDIS_PATIENCE_SECONDS", "600"))
"""How long a worker keeps sending an attempt's outcome (complete, fail, release) to a Redis that cannot be reached
before it gives up; each of those scripts answers the same when the same call arrives twice."""
RUN_TTL_S = float(os.environ.get("SHARDGEN_RUN_TTL_DAYS", "30")) * 86400
"""How long a finished run's records stay in Redis (0: for ever); `shardgen gc` removes them sooner."""
STEP = 100
"""Shards one step of cancel or retry walks: one script of a few milliseconds, so workers' renewals never wait."""
READ_CHUNK = 5000
"""Shard records read per HMGET."""
DETAILS_LIMIT = 100
"""Failed shards a status lists (their count is exact)."""
CLAIM_POPS = 100
STOPPED_KEPT_S = 24 * 3600.0
"""How long `status` lists a worker that stopped itself."""
"""Stale entries one claim may skip before it gives up for this call."""
SHARD_STATES = tuple(state.value for state in ShardState)


@dataclass(frozen=True)
class Claim:
    """One attempt at one shard, leased to one worker."""

    run_id: str
    shard_index: int
    attempt: int
    worker: str


@dataclass
class ShardRecord:
    index: int
    state: str = ShardState.QUEUED.value
    attempt: int = 1
    worker: str | None = None
    rows_done: int = 0
    rows_failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    failures: int = 0
    """Failed attempts that were the shard's own fault (they spend the run's max_retries)."""
    faults: int = 0
    """Attempts failed by their worker's fault (a sick device, a stall)."""
    storage_errors: int = 0
    reassigned: int = 0
    """Times its worker died running it (its lease ran out and was reaped)."""
    released: int = 0
    halvings: int = 0
    error: str | None = None
    result: str | None = None
    """The result object of the attempt recorded as the shard's result."""
    result_attempt: int | None = None
    started_at: float | None = None
    finished_at: float | None = None

    @classmethod
    def from_json(cls, index: int, text: str | bytes | None) -> "ShardRecord":
        data = json.loads(text) if text else {}
        known = {f.name for f in fields(cls)} - {"index"}
        return cls(index=index, **{k: v for k, v in data.items() if k in known})


@dataclass
class RunRecord:
    spec: RunSpec
    state: RunState
    work_dir: str
    queue: str
    rows_total: int
    shards_total: int
    shards: dict[str, int]
    """Shards per state (every ShardState value is a key)."""
    rows_done: int = 0
    rows_failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    retries: int = 0
    reassigned: int = 0
    halvings: int = 0
    worker_faults: int = 0
    storage_errors: int = 0
    reacquired: int = 0
    """Leases that ran out during an outage and were taken back by the worker that held them."""
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    running: list[ShardRecord] = field(default_factory=list)
    failed: list[ShardRecord] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    @property
    def finished(self) -> bool:
        return self.state.finished


@dataclass(frozen=True)
class WorkerInfo:
    worker: str
    queue: str
    device: str
    host: str
    pid: int
    started_at: float
    last_seen: float
    run_id: str | None = None
    shard_index: int | None = None
    metrics_port: int | None = None
    model: dict[str, Any] | None = None
    """The identity of the weights it serves (ModelSpec.identity)."""
    stopped: str | None = None
    """Why it stopped itself (sick, stalled), in `stopped_workers`."""


class RunStore:
    """Every read and transition of run state. Time is Redis's (TIME, inside the scripts), so no worker's clock
    decides a lease or a backoff; `clock` replaces it only in tests that move time."""

    def __init__(self, url: str | None = None, *, client: Any = None, prefix: str = PREFIX,
                 clock: Callable[[], float] | None = None):
        if client is None:
            from ..redis_conn import broker_url, connect

            url = broker_url(url)
            client = connect(url)
        self.url = url
        self.redis = client
        self.prefix = prefix
        self.clock = clock
        prelude = _script_text("prelude")
        self._scripts = {
            name: client.register_script(prelude + "\n" + _script_text(name))
            for name in ("claim", "renew", "complete", "fail", "release", "reap", "redo", "cancel")
        }

    def now(self) -> float:
        """Seconds since the epoch by Redis's clock (or the test's)."""
        if self.clock is not None:
            return self.clock()
        seconds, micros = self.redis.time()
        return int(seconds) + int(micros) / 1e6

    # ------------------------------------------------------------------ keys
    def run_key(self, run_id: str) -> str:
        return f"{self.prefix}:run:{check_run_id(run_id)}"

    def shards_key(self, run_id: str) -> str:
        return f"{self.run_key(run_id)}:shards"

    def lease_key(self, run_id: str, index: int) -> str:
        return f"{self.prefix}:lease:{check_run_id(run_id)}:{int(index)}"

    def delayed_key(self, queue: str) -> str:
        return f"{self.prefix}:delayed:{queue}"

    @property
    def workers_key(self) -> str:
        return f"{self.prefix}:workers"

    def _run(self, name: str, *args: Any) -> Any:
        now = "" if self.clock is None else repr(self.clock())  # '': the script reads Redis's TIME
        return self._scripts[name](keys=[], args=[self.prefix, now, *args])

    def _record(self, name: str, *args: Any) -> Any:
        """Run a script that records how an attempt ended, through an outage of up to REDIS_PATIENCE_S: the
        attempt's work is not thrown away because Redis restarts or fails over while it reports."""
        import redis

        deadline, delay = time.monotonic() + REDIS_PATIENCE_S, 0.5
        while True:
            try:
                return self._run(name, *args)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                if isinstance(exc, redis.exceptions.AuthenticationError) or time.monotonic() > deadline:
                    raise
                log.warning("cannot reach Redis to record an attempt (%s); again in %.0fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 15.0)

    # ------------------------------------------------------------------ creating a run
    def create_run(self, spec: RunSpec, work_dir: str, rows_total: int, shards_total: int) -> str:
        """Record the run and queue every shard, in one transaction; returns the queue's name."""
        queue = spec.model.queue
        now = self.now()
        counters = {f"shards_{state}": 0 for state in SHARD_STATES}
        counters["shards_queued"] = shards_total
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.run_key(spec.run_id), mapping={
            "spec": spec.to_json(), "state": RunState.QUEUED.value, "work_dir": work_dir, "queue": queue,
            "rows_total": rows_total, "shards_total": shards_total, "max_retries": spec.max_retries,
            "rows_done": 0, "rows_failed": 0, "prompt_tokens": 0, "generated_tokens": 0,
            "retries": 0, "reassigned": 0, "halvings": 0, "worker_faults": 0, "storage_errors": 0, "reacquired": 0,
            "created_at": now, "ttl_s": int(RUN_TTL_S), **counters,
        })
        pipe.zadd(f"{self.prefix}:runs", {spec.run_id: now})
        for start in range(0, shards_total, 2000):
            pipe.rpush(queue, *(f"{spec.run_id}|{i}|1" for i in range(start, min(start + 2000, shards_total))))
        pipe.execute()
        return queue

    # ------------------------------------------------------------------ reading
    def spec(self, run_id: str) -> RunSpec:
        raw = self.redis.hget(self.run_key(run_id), "spec")
        if raw is None:
            raise _not_found(run_id)
        return RunSpec.from_json(raw)

    def record(self, run_id: str, *, details: bool = True) -> RunRecord:
        """The run's state and counters; with details, its running and failed shards too."""
        data = _strings(self.redis.hgetall(self.run_key(run_id)))
        if not data:
            raise _not_found(run_id)
        number = lambda name: int(data.get(name, 0))  # noqa: E731
        record = RunRecord(
            spec=RunSpec.from_json(data["spec"]),
            state=RunState(data["state"]),
            work_dir=data["work_dir"],
            queue=data["queue"],
            rows_total=number("rows_total"),
            shards_total=number("shards_total"),
            shards={state: number(f"shards_{state}") for state in SHARD_STATES},
            rows_done=number("rows_done"),
            rows_failed=number("rows_failed"),
            prompt_tokens=number("prompt_tokens"),
            generated_tokens=number("generated_tokens"),
            retries=number("retries"),
            reassigned=number("reassigned"),
            halvings=number("halvings"),
            worker_faults=number("worker_faults"),
            storage_errors=number("storage_errors"),
            reacquired=number("reacquired"),
            created_at=float(data.get("created_at", 0)),
            started_at=float(data["started_at"]) if data.get("started_at") else None,
            finished_at=float(data["finished_at"]) if data.get("finished_at") else None,
        )
        if details:
            record.running = self.shards(run_id, self._members(f"{self.run_key(run_id)}:running"))
            failed = self.redis.srandmember(f"{self.run_key(run_id)}:failed", DETAILS_LIMIT)
            record.failed = self.shards(run_id, [int(m) for m in failed])
        return record

    def shards(self, run_id: str, indices: Iterable[int] | None = None) -> list[ShardRecord]:
        """Records of these shards (all of the run's without indices), in index order."""
        if indices is None:
            total = int(self.redis.hget(self.run_key(run_id), "shards_total") or 0)
            indices = range(total)
        indices = sorted(indices)
        records = []
        for start in range(0, len(indices), READ_CHUNK):  # one HMGET of a million fields holds Redis for seconds
            chunk = indices[start:start + READ_CHUNK]
            raw = self.redis.hmget(self.shards_key(run_id), chunk)
            records.extend(ShardRecord.from_json(i, text) for i, text in zip(chunk, raw))
        return records

    def run_ids(self, limit: int = 20) -> list[str]:
        """The most recent runs still recorded (a finished run's records expire; its entry goes with them)."""
        ids = _strings(self.redis.zrevrange(f"{self.prefix}:runs", 0, limit - 1))
        pipe = self.redis.pipeline(transaction=False)
        for run_id in ids:
            pipe.exists(self.run_key(run_id))
        present = pipe.execute() if ids else []
        gone = [run_id for run_id, there in zip(ids, present) if not there]
        if gone:
            self.redis.zrem(f"{self.prefix}:runs", *gone)
        return [run_id for run_id, there in zip(ids, present) if there]

    def finished_before(self, cutoff: float) -> list[tuple[str, str]]:
        """(run id, work dir) of every run that ended before `cutoff` (Redis time), oldest first."""
        out = []
        for run_id in _strings(self.redis.zrangebyscore(f"{self.prefix}:runs", "-inf", cutoff)):
            state, finished, work_dir = self.redis.hmget(self.run_key(run_id), "state", "finished_at", "work_dir")
            if state is not None and RunState(_string(state)).finished and finished and float(finished) < cutoff:
                out.append((run_id, _string(work_dir)))
        return out

    def remove_run(self, run_id: str) -> None:
        """Forget a run: its records go (UNLINK frees a large one off Redis's main thread) with its list entry."""
        key = self.run_key(run_id)
        self.redis.unlink(key, f"{key}:shards", f"{key}:running", f"{key}:failed")
        self.redis.zrem(f"{self.prefix}:runs", run_id)

    def queue_depth(self, queue: str) -> dict[str, int]:
        """Shards waiting in a queue, and failed shards waiting out their backoff."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(queue)
        pipe.zcard(self.delayed_key(queue))
        waiting, backoff = pipe.execute()
        return {"waiting": int(waiting), "backoff": int(backoff)}

    def due_count(self, queue: str) -> int:
        """Entries a claim could take now: waiting ones plus retries whose backoff is over."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(queue)
        pipe.zcount(self.delayed_key(queue), "-inf", self.now())
        waiting, due = pipe.execute()
        return int(waiting) + int(due)

    def _members(self, key: str) -> list[int]:
        return [int(m) for m in self.redis.smembers(key)]

    # ------------------------------------------------------------------ transitions
    def claim_next(self, queue: str, worker: str, lease_ms: int = LEASE_MS) -> Claim | None:
        """Lease the next current shard waiting in `queue` to `worker`, or None when there is none."""
        taken = self._run("claim", queue, worker, lease_ms, CLAIM_POPS)
        if not taken:
            return None
        run_id, index, attempt = _strings(taken)
        return Claim(run_id, int(index), int(attempt), worker)

    def renew(self, claim: Claim, rows_done: int | None = None, lease_ms: int = LEASE_MS) -> RunState | Outcome:
        """Extend the lease; returns the run's state, or Outcome.LOST when another attempt took the shard over."""
        rows = "" if rows_done is None else rows_done
        answer = _string(self._run("renew", claim.run_id, claim.shard_index, claim.worker, lease_ms, rows, claim.attempt))
        return Outcome.LOST if answer in (Outcome.LOST.value, "missing") else RunState(answer)

    def complete(self, claim: Claim, result: str, *, rows: int, rows_failed: int, prompt_tokens: int,
                 generated_tokens: int, seconds: float, batch_halvings: int = 0) -> Outcome:
        """Record `result` as the shard's result: DONE, or DUPLICATE when another attempt's was recorded first.
        Sending the same completion again (a retried reply) answers DONE again."""
        outcome = self._record("complete", claim.run_id, claim.shard_index, claim.worker, claim.attempt, result,
                            rows, rows_failed, prompt_tokens, generated_tokens, repr(seconds), batch_halvings)
        return Outcome(_string(outcome))

    def fail(self, claim: Claim, error: str, fault: Fault = Fault.SHARD) -> tuple[Outcome, float]:
        """Record a failed attempt: (RETRY, backoff seconds), (FAILED, 0), (CANCELLED, 0) or (STALE, 0). Whose
        `fault` it was decides the budget it spends (scripts/fail.lua)."""
        outcome, delay = self._record("fail", claim.run_id, claim.shard_index, claim.worker, claim.attempt,
                                   error[:2000], policy.BACKOFF_BASE_S, policy.BACKOFF_CAP_S, Fault(fault).value,
                                   STORAGE_PATIENCE_S)
        return Outcome(_string(outcome)), float(_string(delay))

    def release(self, claim: Claim, reason: str) -> Outcome:
        """Give a running shard back: 'shutdown' puts it at the front of its queue (RELEASED), 'cancelled' ends it
        (CANCELLED); STALE when this worker no longer held it."""
        assert reason in ("shutdown", "cancelled"), reason
        return Outcome(_string(self._record("release", claim.run_id, claim.shard_index, claim.worker, claim.attempt, reason)))

    def reap_expired_leases(self) -> list[tuple[str, int, ShardState]]:
        """(run, shard, the state it moved to) for each shard whose worker stopped renewing its lease; each is
        reaped once, whoever calls this."""
        flat = _strings(self._run("reap", LEASE_MS, QUIET_MS))
        out = []
        for member, state in zip(flat[::2], flat[1::2]):
            run_id, index = member.rsplit("|", 1)
            out.append((run_id, int(index), ShardState(state)))
        return out

    def redo(self, run_id: str, missing_results: Iterable[int] = (), *, failed_rows: bool = False) -> int:
        """Queue again every shard without a result that is not running, and with `failed_rows` every done shard
        with failed rows (see scripts/redo.lua)."""
        missing = sorted(set(missing_results))
        requeued, start, was_cancelled = 0, 0, ""
        while start >= 0:
            step_missing = [i for i in missing if start <= i < start + STEP]
            count, start, was_cancelled = self._run("redo", check_run_id(run_id), "1" if failed_rows else "0", start,
                                                    STEP, was_cancelled, *step_missing)
            if int(count) < 0:
                raise _not_found(run_id)
            requeued, start, was_cancelled = requeued + int(count), int(start), _string(was_cancelled)
        return requeued

    def cancel(self, run_id: str) -> RunState | None:
        """Cancel the run; returns None, or the state it had already ended in (nothing changed then)."""
        outcome, start = self._run("cancel", check_run_id(run_id), 0, STEP)
        outcome, start = _string(outcome), int(start)
        if outcome == "missing":
            raise _not_found(run_id)
        if outcome.startswith("ended:"):
            return RunState(outcome.removeprefix("ended:"))
        while start >= 0:  # the run is cancelled already; the rest marks its queued shards, a step at a time
            start = int(self._run("cancel", run_id, start, STEP)[1])
        return None

    # ------------------------------------------------------------------ workers
    def heartbeat_worker(self, info: WorkerInfo) -> None:
        self.redis.hset(self.workers_key, info.worker, json.dumps(info.__dict__))

    def remove_worker(self, worker: str) -> None:
        self.redis.hdel(self.workers_key, worker)

    @property
    def stopped_key(self) -> str:
        return f"{self.prefix}:stopped"

    def worker_stopped(self, info: WorkerInfo, reason: str) -> None:
        """A worker stops itself (its device is sick, its shard stalled): it leaves the live workers, and
        `status` shows why for STOPPED_KEPT_S."""
        stopped = dataclasses.replace(info, stopped=reason, last_seen=self.now())
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self.workers_key, info.worker)
        pipe.hset(self.stopped_key, info.worker, json.dumps(stopped.__dict__))
        pipe.execute()

    def stopped_workers(self) -> list[WorkerInfo]:
        """Workers that stopped themselves in the last STOPPED_KEPT_S seconds, and why; older entries are dropped."""
        now = self.now()
        recent, old = [], []
        for raw in self.redis.hvals(self.stopped_key):
            info = WorkerInfo(**json.loads(raw))
            (recent if now - info.last_seen <= STOPPED_KEPT_S else old).append(info)
        if old:
            self.redis.hdel(self.stopped_key, *(info.worker for info in old))
        return sorted(recent, key=lambda info: info.last_seen)

    def workers(self, *, live_within_s: float = policy.WORKER_LIVE_S) -> list[WorkerInfo]:
        """Workers that sent a heartbeat in the last `live_within_s` seconds; older entries are dropped."""
        now = self.now()
        live, stale = [], []
        for worker, raw in self.redis.hgetall(self.workers_key).items():
            info = WorkerInfo(**json.loads(raw))
            (live if now - info.last_seen <= live_within_s else stale).append(info)
        if stale:
            self.redis.hdel(self.workers_key, *(info.worker for info in stale))
        return sorted(live, key=lambda info: info.worker)


def _script_text(name: str) -> str:
    return resources.files(__package__).joinpath("scripts", f"{name}.lua").read_text(encoding="utf-8")


def _not_found(run_id: str) -> RunNotFound:
    return RunNotFound(f"no run {run_id} is recorded on this broker", "list the runs with `shardgen status` (no run id)")


def _string(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _strings(value: Any) -> Any:
    if isinstance(value, dict):
        return {_string(k): _string(v) for k, v in value.items()}
    return [_string(v) for v in value]
