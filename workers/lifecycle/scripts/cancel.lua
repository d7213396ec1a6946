-- Cancel a run unless it has ended: queued shards become cancelled now; running ones stop at their worker's
-- next lease renewal. ARGV: prefix, now, run. Returns 'cancelled' when this call cancelled it,
-- 'ended:<state>' when it had already ended, or 'missing'.
local run = ARGV[3]
local key = run_key(run)
local state = redis.call('HGET', key, 'state')
if not state then return 'missing' end
if state == 'done' or state == 'failed' or state == 'cancelled' then return 'ended:' .. state end
redis.call('HSET', key, 'state', 'cancelled', 'finished_at', now)
for number = 0, tonumber(redis.call('HGET', key, 'shards_total')) - 1 do
  local index = tostring(number)
  local shard = load_shard(run, index)
  if shard.state == 'queued' then
    set_state(run, index, shard, 'cancelled')
    save_shard(run, index, shard)
  end
end
return 'cancelled'
