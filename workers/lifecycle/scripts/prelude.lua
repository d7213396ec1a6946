-- Loaded in front of every lifecycle script: keys, a shard's record, per-state counters, the end of a run.
-- Every script takes ARGV[1] = key prefix and ARGV[2] = now: '' for Redis's own clock (TIME), so that no
-- worker's clock decides a lease or a backoff; a number (seconds since the epoch) only from a test's clock.
local prefix = ARGV[1]
local function redis_now()
  local time = redis.call('TIME')
  return tonumber(time[1]) + tonumber(time[2]) / 1000000
end
local now = ARGV[2] == '' and redis_now() or tonumber(ARGV[2])
local leases_key = prefix .. ':leases'
local seen_key = prefix .. ':seen'

local function run_key(run) return prefix .. ':run:' .. run end
local function shards_key(run) return run_key(run) .. ':shards' end
local function lease_key(run, index) return prefix .. ':lease:' .. run .. ':' .. index end
local function delayed_key(queue) return prefix .. ':delayed:' .. queue end

-- A shard never claimed has no record yet: it is queued, on its first attempt.
local function load_shard(run, index)
  local raw = redis.call('HGET', shards_key(run), index)
  if raw then return cjson.decode(raw) end
  return {state = 'queued', attempt = 1}
end

local function save_shard(run, index, shard)
  redis.call('HSET', shards_key(run), index, cjson.encode(shard))
end

-- Moves the run's per-state counters (and its running and failed sets) with the shard.
local function set_state(run, index, shard, state)
  if shard.state == state then return end
  local key = run_key(run)
  redis.call('HINCRBY', key, 'shards_' .. shard.state, -1)
  redis.call('HINCRBY', key, 'shards_' .. state, 1)
  if shard.state == 'running' or shard.state == 'failed' then redis.call('SREM', key .. ':' .. shard.state, index) end
  if state == 'running' or state == 'failed' then redis.call('SADD', key .. ':' .. state, index) end
  shard.state = state
end

local function drop_lease(run, index)
  redis.call('DEL', lease_key(run, index))
  redis.call('ZREM', leases_key, run .. '|' .. index)
end

-- Back into its queue under a new attempt number, so that any entry of an earlier attempt still in the
-- list is recognised as stale when popped: one shard, at most one live entry.
local function enqueue(run, index, shard, front)
  shard.attempt = (shard.attempt or 1) + 1
  set_state(run, index, shard, 'queued')
  local entry = run .. '|' .. index .. '|' .. shard.attempt
  local queue = redis.call('HGET', run_key(run), 'queue')
  if front then redis.call('LPUSH', queue, entry) else redis.call('RPUSH', queue, entry) end
end

-- A finished run's keys expire after the run's ttl_s (0: never); retry makes them last again (keep_run).
local function run_keys(run)
  local key = run_key(run)
  return {key, shards_key(run), key .. ':running', key .. ':failed'}
end

local function expire_finished(run)
  local ttl = tonumber(redis.call('HGET', run_key(run), 'ttl_s') or 0)
  if ttl > 0 then
    for _, key in ipairs(run_keys(run)) do redis.call('EXPIRE', key, ttl) end
  end
end

local function keep_run(run)
  for _, key in ipairs(run_keys(run)) do redis.call('PERSIST', key) end
end

-- A run ends when every shard is done (done) or ended with at least one failed for good (failed).
local function end_run_if_finished(run)
  local key = run_key(run)
  if redis.call('HGET', key, 'state') == 'cancelled' then return end
  local total = tonumber(redis.call('HGET', key, 'shards_total'))
  local done = tonumber(redis.call('HGET', key, 'shards_done'))
  local failed = tonumber(redis.call('HGET', key, 'shards_failed'))
  if done == total then
    redis.call('HSET', key, 'state', 'done', 'finished_at', now)
    expire_finished(run)
  elseif done + failed == total then
    redis.call('HSET', key, 'state', 'failed', 'finished_at', now)
    expire_finished(run)
  end
end
