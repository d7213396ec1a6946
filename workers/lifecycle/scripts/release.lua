-- A worker gives a running shard back: it is shutting down (the shard goes to the front of its queue at
-- once, no retry counted) or the run was cancelled. ARGV: prefix, now, run, index, worker, attempt, reason
-- ('shutdown' or 'cancelled'). Returns 'released', 'cancelled' or 'stale'.
local run, index, worker, attempt = ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local shard = load_shard(run, index)
if shard.state ~= 'running' or shard.worker ~= worker or shard.attempt ~= attempt then return 'stale' end
drop_lease(run, index)
if ARGV[7] == 'cancelled' or redis.call('HGET', run_key(run), 'state') == 'cancelled' then
  set_state(run, index, shard, 'cancelled')
  save_shard(run, index, shard)
  return 'cancelled'
end
shard.released = (shard.released or 0) + 1
enqueue(run, index, shard, true)
save_shard(run, index, shard)
return 'released'
