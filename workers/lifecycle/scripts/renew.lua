-- Extend a running shard's lease and publish its progress. ARGV: prefix, now, run, index, worker, lease_ms,
-- rows_done ('' to leave it). Returns the run's state, or 'lost' when the worker no longer holds the lease.
local run, index, worker, lease_ms = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local lease = lease_key(run, index)
if redis.call('GET', lease) ~= worker then return 'lost' end
redis.call('PEXPIRE', lease, lease_ms)
redis.call('ZADD', leases_key, now * 1000 + lease_ms, run .. '|' .. index)
if ARGV[7] ~= '' then
  local shard = load_shard(run, index)
  if shard.state == 'running' and shard.worker == worker then
    shard.rows_done = tonumber(ARGV[7])
    save_shard(run, index, shard)
  end
end
return redis.call('HGET', run_key(run), 'state') or 'missing'
