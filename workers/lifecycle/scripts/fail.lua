-- An attempt raised: queue the shard again, or fail it for good, in this one step. ARGV: prefix, now, run,
-- index, worker, attempt, error, backoff_base_s, backoff_cap_s, fault, storage_patience_s.
-- `fault` says whose fault it was (schemas/states.py Fault), and so which budget it spends:
--   shard    the shard's own: after a backoff, until the run's max_retries are used up
--   worker   the worker's (a sick device, every row raised, a stall): straight back to the end of the queue for
--            another worker, no backoff and no retry spent; only a shard that faults 2 * (max_retries + 1)
--            workers in a row fails for good
--   storage  the work directory's: after a backoff, spending nothing for storage_patience_s since the first
--            of these errors in a row; then like a shard fault
-- Returns {outcome, delay_s}: outcome 'retry', 'failed', 'cancelled' or 'stale' (the worker no longer holds this
-- attempt: the shard was taken over or has ended).
local run, index, worker, attempt = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local base, cap, fault, patience = tonumber(ARGV[8]), tonumber(ARGV[9]), ARGV[10], tonumber(ARGV[11])
local shard = load_shard(run, index)
if shard.state ~= 'running' or shard.worker ~= worker or shard.attempt ~= attempt then return {'stale', 0} end
drop_lease(run, index)
shard.error = ARGV[7]
local key = run_key(run)
if redis.call('HGET', key, 'state') == 'cancelled' then
  set_state(run, index, shard, 'cancelled')
  save_shard(run, index, shard)
  return {'cancelled', 0}
end
local max_retries = tonumber(redis.call('HGET', key, 'max_retries'))

local function fail_for_good()
  set_state(run, index, shard, 'failed')
  shard.finished_at = now
  save_shard(run, index, shard)
  end_run_if_finished(run)
  return {'failed', 0}
end

local function again_after(delay)
  shard.attempt = shard.attempt + 1
  set_state(run, index, shard, 'queued')
  save_shard(run, index, shard)
  local queue = redis.call('HGET', key, 'queue')
  local entry = run .. '|' .. index .. '|' .. shard.attempt
  if delay > 0 then redis.call('ZADD', delayed_key(queue), now + delay, entry) else redis.call('RPUSH', queue, entry) end
  return {'retry', tostring(delay)}
end

if fault ~= 'storage' then shard.storage_since = nil end
if fault == 'worker' then
  shard.faults = (shard.faults or 0) + 1
  redis.call('HINCRBY', key, 'worker_faults', 1)
  if shard.faults > 2 * (max_retries + 1) then
    shard.error = 'its workers faulted ' .. shard.faults .. ' times while running it; last: ' .. ARGV[7]
    return fail_for_good()
  end
  return again_after(0)
end
if fault == 'storage' then
  shard.storage_errors = (shard.storage_errors or 0) + 1
  shard.storage_since = shard.storage_since or now
  redis.call('HINCRBY', key, 'storage_errors', 1)
  if now - shard.storage_since < patience then
    return again_after(math.min(base * 2 ^ (shard.storage_errors - 1), cap))
  end
end
shard.failures = (shard.failures or 0) + 1
if shard.failures > max_retries then return fail_for_good() end
redis.call('HINCRBY', key, 'retries', 1)
return again_after(math.min(base * 2 ^ (shard.failures - 1), cap))
