-- An attempt raised: queue the shard again after a backoff, or fail it for good once the run's max_retries
-- are used up, in this one step. ARGV: prefix, now, run, index, worker, attempt, error, backoff_base_s,
-- backoff_cap_s. Returns {outcome, delay_s}: outcome 'retry', 'failed', 'cancelled' or 'stale' (the worker
-- no longer holds this attempt: the shard was taken over or has ended).
local run, index, worker, attempt = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local shard = load_shard(run, index)
if shard.state ~= 'running' or shard.worker ~= worker or shard.attempt ~= attempt then return {'stale', 0} end
drop_lease(run, index)
shard.error = ARGV[7]
shard.failures = (shard.failures or 0) + 1
local key = run_key(run)
if redis.call('HGET', key, 'state') == 'cancelled' then
  set_state(run, index, shard, 'cancelled')
  save_shard(run, index, shard)
  return {'cancelled', 0}
end
if shard.failures > tonumber(redis.call('HGET', key, 'max_retries')) then
  set_state(run, index, shard, 'failed')
  shard.finished_at = now
  save_shard(run, index, shard)
  end_run_if_finished(run)
  return {'failed', 0}
end
local delay = math.min(tonumber(ARGV[8]) * 2 ^ (shard.failures - 1), tonumber(ARGV[9]))
shard.attempt = shard.attempt + 1
set_state(run, index, shard, 'queued')
save_shard(run, index, shard)
redis.call('HINCRBY', key, 'retries', 1)
local queue = redis.call('HGET', key, 'queue')
redis.call('ZADD', delayed_key(queue), now + delay, run .. '|' .. index .. '|' .. shard.attempt)
return {'retry', tostring(delay)}
