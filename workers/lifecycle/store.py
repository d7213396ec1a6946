"""Run state in Redis: the run record, its shards, their rows and their leases.

Keys, all under one prefix so deployments can share a server:
  {p}:runs                    zset   run id -> created time
  {p}:run:{id}                hash   spec (JSON), state, counters, times, work_dir
  {p}:run:{id}:shards         hash   shard index -> JSON {state, attempts, worker, rows, ...}
  {p}:run:{id}:rows:{i}       string the shard's input rows (JSON), so a retry never needs the input file
  {p}:lease:{id}:{i}          string worker id, with a TTL the running worker renews

Every transition that must not race (claim, complete, fail) is one Lua script.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from shardgen.schemas.errors import BrokerError, RunNotFound
from shardgen.schemas.run import RunSpec
from shardgen.schemas.shard import InputRow, ShardState, check_run_id, rows_from_json

from ..redis_conn import connect

PREFIX = "sg"
# A running shard renews its lease every few seconds; one that expires (worker killed, host gone) is requeued.
LEASE_MS = int(float(os.environ.get("SHARDGEN_LEASE_SECONDS", "30")) * 1000)

_CLAIM = """
local run, shards, lease = KEYS[1], KEYS[2], KEYS[3]
local index, worker, attempt, lease_ms, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local state = redis.call('HGET', run, 'state')
if not state then return 'missing' end
if state == 'cancelled' then return 'cancelled' end
local shard = cjson.decode(redis.call('HGET', shards, index) or '{}')
if shard.state == 'done' or shard.state == 'failed' then return shard.state end
local holder = redis.call('GET', lease)
if holder and holder ~= worker then return 'leased' end
redis.call('SET', lease, worker, 'PX', lease_ms)
redis.call('ZADD', KEYS[4], tonumber(ARGV[6]) + lease_ms, ARGV[7])
shard.state = 'running'
shard.worker = worker
shard.attempts = math.max(shard.attempts or 0, attempt)
shard.started_at = tonumber(now)
shard.rows_done = 0
redis.call('HSET', shards, index, cjson.encode(shard))
if state == 'queued' then
  redis.call('HSET', run, 'state', 'running', 'started_at', now)
end
return 'claimed'
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  redis.call('ZADD', KEYS[3], tonumber(ARGV[5]) + tonumber(ARGV[2]), ARGV[6])
  if ARGV[3] ~= '' then
    local shard = cjson.decode(redis.call('HGET', KEYS[2], ARGV[4]) or '{}')
    if shard.state == 'running' and shard.worker == ARGV[1] then
      shard.rows_done = tonumber(ARGV[3])
      redis.call('HSET', KEYS[2], ARGV[4], cjson.encode(shard))
    end
  end
  return 1
end
return 0
"""

_COMPLETE = """
local run, shards, lease = KEYS[1], KEYS[2], KEYS[3]
local index, worker, now = ARGV[1], ARGV[2], ARGV[3]
local rows, failed, ptok, gtok, secs = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local shard = cjson.decode(redis.call('HGET', shards, index) or '{}')
if shard.state == 'done' then return 0 end
local was_failed = shard.state == 'failed'
shard.state = 'done'
shard.worker = worker
shard.finished_at = tonumber(now)
shard.rows_done = rows
shard.rows_failed = failed
shard.generated_tokens = gtok
shard.prompt_tokens = ptok
shard.seconds = secs
shard.halvings = (shard.halvings or 0) + tonumber(ARGV[9])
shard.error = nil
redis.call('HSET', shards, index, cjson.encode(shard))
if redis.call('GET', lease) == worker then redis.call('DEL', lease) end
redis.call('ZREM', KEYS[4], ARGV[10])
redis.call('HINCRBY', run, 'rows_done', rows)
redis.call('HINCRBY', run, 'rows_failed', failed)
redis.call('HINCRBY', run, 'prompt_tokens', ptok)
redis.call('HINCRBY', run, 'generated_tokens', gtok)
local done = redis.call('HINCRBY', run, 'shards_done', 1)
if was_failed then redis.call('HINCRBY', run, 'shards_failed', -1) end
local total = tonumber(redis.call('HGET', run, 'shards_total'))
local nfailed = tonumber(redis.call('HGET', run, 'shards_failed') or '0')
local state = redis.call('HGET', run, 'state')
if state ~= 'cancelled' then
  if done == total then
    redis.call('HSET', run, 'state', 'done', 'finished_at', now)
  elseif done + nfailed == total then
    redis.call('HSET', run, 'state', 'failed', 'finished_at', now)
  end
end
return 1
"""

_FAIL = """
local run, shards, lease = KEYS[1], KEYS[2], KEYS[3]
local index, worker, now, err, final = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5] == '1'
local shard = cjson.decode(redis.call('HGET', shards, index) or '{}')
if shard.state == 'done' or shard.state == 'failed' then return 0 end
if redis.call('GET', lease) == worker then redis.call('DEL', lease) end
redis.call('ZREM', KEYS[4], ARGV[6])
shard.error = err
shard.worker = worker
if final then
  shard.state = 'failed'
  shard.finished_at = tonumber(now)
  redis.call('HSET', shards, index, cjson.encode(shard))
  local nfailed = redis.call('HINCRBY', run, 'shards_failed', 1)
  local done = tonumber(redis.call('HGET', run, 'shards_done') or '0')
  local total = tonumber(redis.call('HGET', run, 'shards_total'))
  if done + nfailed == total and redis.call('HGET', run, 'state') ~= 'cancelled' then
    redis.call('HSET', run, 'state', 'failed', 'finished_at', now)
  end
elseif ARGV[5] == 'cancelled' then
  shard.state = 'cancelled'
  redis.call('HSET', shards, index, cjson.encode(shard))
else
  shard.state = 'queued'
  shard.retries = (shard.retries or 0) + 1
  redis.call('HSET', shards, index, cjson.encode(shard))
end
return 1
"""

# Shards whose lease ran out (their worker died or lost its host) go back to the queue, each exactly once.
_REAP = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 200)
local requeued = {}
for _, member in ipairs(expired) do
  local run, index = string.match(member, '^(.+)|(%d+)$')
  local lease_key = ARGV[2] .. ':lease:' .. run .. ':' .. index
  local ttl = redis.call('PTTL', lease_key)
  if ttl > 0 then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + ttl, member)
  else
    redis.call('ZREM', KEYS[1], member)
    local shards_key = ARGV[2] .. ':run:' .. run .. ':shards'
    local raw = redis.call('HGET', shards_key, index)
    if raw then
      local shard = cjson.decode(raw)
      if shard.state == 'running' then
        shard.state = 'queued'
        shard.reassigned = (shard.reassigned or 0) + 1
        shard.error = 'worker ' .. (shard.worker or '?') .. ' stopped renewing its lease'
        redis.call('HSET', shards_key, index, cjson.encode(shard))
        table.insert(requeued, member)
        table.insert(requeued, shard.attempts or 1)
        table.insert(requeued, shard.reassigned)
      end
    end
  end
end
return requeued
"""

# Put shards back to queued for a retry or resume, undoing their share of the run's counters.
_RESET = """
local run, shards = KEYS[1], KEYS[2]
local reset = 0
for i = 2, #ARGV do
  local index = ARGV[i]
  local shard = cjson.decode(redis.call('HGET', shards, index) or '{}')
  if shard.state == 'failed' then
    redis.call('HINCRBY', run, 'shards_failed', -1)
  elseif shard.state == 'done' then
    redis.call('HINCRBY', run, 'shards_done', -1)
    -- 0 - x, not -x: Lua's -0 becomes the string "-0", which HINCRBY refuses
    redis.call('HINCRBY', run, 'rows_done', 0 - (shard.rows_done or 0))
    redis.call('HINCRBY', run, 'rows_failed', 0 - (shard.rows_failed or 0))
    redis.call('HINCRBY', run, 'generated_tokens', 0 - (shard.generated_tokens or 0))
    redis.call('HINCRBY', run, 'prompt_tokens', 0 - (shard.prompt_tokens or 0))
  end
  if shard.state ~= 'running' then
    shard.state = 'queued'
    shard.rows_done = 0
    shard.error = nil
    shard.retries = (shard.retries or 0) + 1
    redis.call('HSET', shards, index, cjson.encode(shard))
    reset = reset + 1
  end
end
if reset > 0 then
  local started = redis.call('HGET', run, 'started_at')
  redis.call('HSET', run, 'state', started and 'running' or 'queued')
  redis.call('HDEL', run, 'finished_at')
end
return reset
"""


@dataclass
class ShardRecord:
    index: int
    state: str = ShardState.QUEUED.value
    attempts: int = 0
    worker: str | None = None
    rows: int = 0
    rows_done: int = 0
    rows_failed: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    retries: int = 0
    reassigned: int = 0
    halvings: int = 0
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None

    @classmethod
    def from_json(cls, index: int, text: str | bytes | None) -> "ShardRecord":
        data = json.loads(text) if text else {}
        known = cls.__dataclass_fields__
        return cls(index=index, **{k: v for k, v in data.items() if k in known and k != "index"})


@dataclass
class RunRecord:
    spec: RunSpec
    state: str
    work_dir: str
    rows_total: int
    shards_total: int
    rows_done: int = 0
    rows_failed: int = 0
    shards_done: int = 0
    shards_failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    shards: list[ShardRecord] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    @property
    def finished(self) -> bool:
        return self.state in (ShardState.DONE.value, ShardState.FAILED.value, ShardState.CANCELLED.value)


class RunStore:
    def __init__(self, url: str, prefix: str = PREFIX, client: Any = None):
        self.url = url
        self.prefix = prefix
        self.redis = client if client is not None else connect(url)
        self._claim = self.redis.register_script(_CLAIM)
        self._renew = self.redis.register_script(_RENEW)
        self._complete = self.redis.register_script(_COMPLETE)
        self._fail = self.redis.register_script(_FAIL)
        self._reap = self.redis.register_script(_REAP)
        self._reset = self.redis.register_script(_RESET)

    # keys
    def run_key(self, run_id: str) -> str:
        return f"{self.prefix}:run:{check_run_id(run_id)}"

    def shards_key(self, run_id: str) -> str:
        return f"{self.run_key(run_id)}:shards"

    def rows_key(self, run_id: str, index: int) -> str:
        return f"{self.run_key(run_id)}:rows:{int(index)}"

    def lease_key(self, run_id: str, index: int) -> str:
        return f"{self.prefix}:lease:{check_run_id(run_id)}:{int(index)}"

    @property
    def leases_key(self) -> str:
        return f"{self.prefix}:leases"

    def _shard_keys(self, run_id: str, index: int) -> list[str]:
        return [self.run_key(run_id), self.shards_key(run_id), self.lease_key(run_id, index), self.leases_key]

    # creating and reading runs
    def create_run(self, spec: RunSpec, work_dir: str) -> None:
        now = time.time()
        self.redis.hset(
            self.run_key(spec.run_id),
            mapping={
                "spec": spec.to_json(),
                "state": ShardState.QUEUED.value,
                "work_dir": work_dir,
                "rows_total": 0,
                "shards_total": 0,
                "rows_done": 0,
                "rows_failed": 0,
                "shards_done": 0,
                "shards_failed": 0,
                "prompt_tokens": 0,
                "generated_tokens": 0,
                "created_at": now,
            },
        )
        self.redis.zadd(f"{self.prefix}:runs", {spec.run_id: now})

    def add_shard(self, run_id: str, index: int, rows: list[InputRow], rows_json: str, pipe: Any = None) -> None:
        target = pipe if pipe is not None else self.redis
        target.set(self.rows_key(run_id, index), rows_json)
        target.hset(self.shards_key(run_id), index, json.dumps({"state": "queued", "attempts": 0, "rows": len(rows)}))
        target.hincrby(self.run_key(run_id), "shards_total", 1)
        target.hincrby(self.run_key(run_id), "rows_total", len(rows))

    def exists(self, run_id: str) -> bool:
        return bool(self.redis.exists(self.run_key(run_id)))

    def spec(self, run_id: str) -> RunSpec:
        raw = self.redis.hget(self.run_key(run_id), "spec")
        if raw is None:
            raise RunNotFound(f"no run {run_id} is recorded on this broker", "check the id with `shardgen status --list`")
        return RunSpec.from_json(raw)

    def shard_rows(self, run_id: str, index: int) -> list[InputRow]:
        raw = self.redis.get(self.rows_key(run_id, index))
        if raw is None:
            raise RunNotFound(f"run {run_id} has no shard {index}")
        return rows_from_json(raw)

    def run_ids(self, limit: int = 20) -> list[str]:
        return [r.decode() if isinstance(r, bytes) else r for r in self.redis.zrevrange(f"{self.prefix}:runs", 0, limit - 1)]

    def record(self, run_id: str, with_shards: bool = True) -> RunRecord:
        raw = self.redis.hgetall(self.run_key(run_id))
        if not raw:
            raise RunNotFound(f"no run {run_id} is recorded on this broker", "list runs with `shardgen status` (no id)")
        data = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()}
        record = RunRecord(
            spec=RunSpec.from_json(data["spec"]),
            state=data["state"],
            work_dir=data.get("work_dir", ""),
            rows_total=int(data.get("rows_total", 0)),
            shards_total=int(data.get("shards_total", 0)),
            rows_done=int(data.get("rows_done", 0)),
            rows_failed=int(data.get("rows_failed", 0)),
            shards_done=int(data.get("shards_done", 0)),
            shards_failed=int(data.get("shards_failed", 0)),
            prompt_tokens=int(data.get("prompt_tokens", 0)),
            generated_tokens=int(data.get("generated_tokens", 0)),
            created_at=float(data.get("created_at", 0)),
            started_at=float(data["started_at"]) if data.get("started_at") else None,
            finished_at=float(data["finished_at"]) if data.get("finished_at") else None,
        )
        if with_shards:
            shards = self.redis.hgetall(self.shards_key(run_id))
            record.shards = sorted(
                (ShardRecord.from_json(int(k), v) for k, v in shards.items()), key=lambda s: s.index
            )
        return record

    # transitions, each one atomic
    def claim(self, run_id: str, index: int, worker: str, attempt: int, lease_ms: int = LEASE_MS) -> str:
        """'claimed', or why not: 'done', 'failed', 'cancelled', 'leased' (another live worker has it), 'missing'."""
        now = time.time()
        args = [index, worker, attempt, lease_ms, now, int(now * 1000), lease_member(run_id, index)]
        result = self._claim(keys=self._shard_keys(run_id, index), args=args)
        return result.decode() if isinstance(result, bytes) else result

    def renew(self, run_id: str, index: int, worker: str, rows_done: int | None = None, lease_ms: int = LEASE_MS) -> bool:
        keys = [self.lease_key(run_id, index), self.shards_key(run_id), self.leases_key]
        args = [worker, lease_ms, "" if rows_done is None else rows_done, index, int(time.time() * 1000), lease_member(run_id, index)]
        return bool(self._renew(keys=keys, args=args))

    def complete(
        self,
        run_id: str,
        index: int,
        worker: str,
        *,
        rows: int,
        rows_failed: int,
        prompt_tokens: int,
        generated_tokens: int,
        seconds: float,
        batch_halvings: int = 0,
    ) -> bool:
        """Mark the shard done once; False when it already was (a late duplicate)."""
        args = [index, worker, time.time(), rows, rows_failed, prompt_tokens, generated_tokens, seconds, batch_halvings, lease_member(run_id, index)]
        return bool(self._complete(keys=self._shard_keys(run_id, index), args=args))

    def fail(self, run_id: str, index: int, worker: str, error: str, *, final: bool) -> bool:
        """Record a failed attempt: back to queued for a retry, or failed for good when final."""
        args = [index, worker, time.time(), error[:2000], "1" if final else "0", lease_member(run_id, index)]
        return bool(self._fail(keys=self._shard_keys(run_id, index), args=args))

    def release_cancelled(self, run_id: str, index: int, worker: str) -> None:
        args = [index, worker, time.time(), "cancelled by user", "cancelled", lease_member(run_id, index)]
        self._fail(keys=self._shard_keys(run_id, index), args=args)

    def reap_expired_leases(self) -> list[tuple[str, int, int, int]]:
        """(run_id, shard, attempts, reassigned) for each shard whose worker stopped renewing; each is returned once."""
        flat = self._reap(keys=[self.leases_key], args=[int(time.time() * 1000), self.prefix])
        out = []
        for i in range(0, len(flat), 3):
            member = flat[i].decode() if isinstance(flat[i], bytes) else flat[i]
            run_id, index = member.rsplit("|", 1)
            out.append((run_id, int(index), int(flat[i + 1]), int(flat[i + 2])))
        return out

    def reset_shards(self, run_id: str, indices: list[int]) -> int:
        """Queue these shards again (failed, cancelled, lost or missing their file); returns how many."""
        if not indices:
            return 0
        return int(self._reset(keys=[self.run_key(run_id), self.shards_key(run_id)], args=[0, *indices]))

    def cancel(self, run_id: str) -> bool:
        """Mark the run cancelled; False if it had already ended."""
        record = self.record(run_id, with_shards=False)
        if record.finished:
            return False
        self.redis.hset(self.run_key(run_id), mapping={"state": ShardState.CANCELLED.value, "finished_at": time.time()})
        return True

    def is_cancelled(self, run_id: str) -> bool:
        state = self.redis.hget(self.run_key(run_id), "state")
        return (state.decode() if isinstance(state, bytes) else state) == ShardState.CANCELLED.value

    def ping(self) -> None:
        try:
            self.redis.ping()
        except Exception as exc:  # redis raises several connection error types
            raise BrokerError(f"Redis did not answer a ping: {exc}") from None


def lease_member(run_id: str, index: int) -> str:
    return f"{run_id}|{int(index)}"
