-- Extend a running shard's lease and publish its progress. ARGV: prefix, now, run, index, worker, lease_ms,
-- rows_done ('' to leave it), attempt. Returns the run's state, or 'lost' when another attempt holds the shard.
-- A lease that ran out while nobody took the shard over (Redis paused or unreachable for longer than a lease,
-- a long pause of the worker) is taken back: the attempt still owns the shard, and no death is counted.
local run, index, worker, lease_ms, attempt = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[8])
local lease = lease_key(run, index)
local holder = redis.call('GET', lease)
local shard = nil
if holder ~= worker then
  if holder then return 'lost' end
  shard = load_shard(run, index)
  if shard.state ~= 'running' or shard.worker ~= worker or shard.attempt ~= attempt then return 'lost' end
  redis.call('HINCRBY', run_key(run), 'reacquired', 1)
end
redis.call('SET', lease, worker, 'PX', lease_ms)
redis.call('ZADD', leases_key, now * 1000 + lease_ms, run .. '|' .. index)
if ARGV[7] ~= '' then
  shard = shard or load_shard(run, index)
  if shard.state == 'running' and shard.worker == worker then
    shard.rows_done = tonumber(ARGV[7])
    save_shard(run, index, shard)
  end
end
return redis.call('HGET', run_key(run), 'state') or 'missing'
