-- Shards whose worker stopped renewing its lease (killed, host gone) go back to the front of their queue,
-- each exactly once whoever runs this; a shard whose workers keep dying fails for good.
-- ARGV: prefix, now, lease_ms, quiet_ms. Returns a flat list: run|index, the state it moved the shard to
-- ('queued', 'failed' or 'cancelled'), ...
-- Every live worker's watchdog reaps every few seconds. When none has for quiet_ms, Redis was away (paused,
-- restarting, cut off) or the whole fleet was: leases that ran out meanwhile say nothing about deaths, so each
-- gets one more lease to be renewed (renew.lua takes it back) before it is reaped. Only reaps count: after an
-- outage the first call to arrive may be one worker's renewal, and the silence must still be seen.
local lease_ms, quiet_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
local last_seen = tonumber(redis.call('GET', seen_key) or now)
redis.call('SET', seen_key, now)
local expired = redis.call('ZRANGEBYSCORE', leases_key, '-inf', now * 1000, 'LIMIT', 0, 200)
local out = {}
if (now - last_seen) * 1000 > quiet_ms then
  for _, member in ipairs(expired) do redis.call('ZADD', leases_key, now * 1000 + lease_ms, member) end
  return out
end
for _, member in ipairs(expired) do
  local run, index = string.match(member, '^(.+)|(%d+)$')
  local ttl = redis.call('PTTL', lease_key(run, index))
  if ttl > 0 then
    redis.call('ZADD', leases_key, now * 1000 + ttl, member)
  else
    redis.call('ZREM', leases_key, member)
    local key = run_key(run)
    local shard = load_shard(run, index)
    if redis.call('EXISTS', key) == 1 and shard.state == 'running' then
      shard.reassigned = (shard.reassigned or 0) + 1
      shard.error = 'worker ' .. (shard.worker or '?') .. ' stopped renewing its lease'
      redis.call('HINCRBY', key, 'reassigned', 1)
      local outcome
      if redis.call('HGET', key, 'state') == 'cancelled' then
        set_state(run, index, shard, 'cancelled')
        outcome = 'cancelled'
      elseif shard.reassigned > tonumber(redis.call('HGET', key, 'max_retries')) + 1 then
        shard.error = 'its worker died ' .. shard.reassigned .. ' times while running it'
        set_state(run, index, shard, 'failed')
        shard.finished_at = now
        outcome = 'failed'
      else
        enqueue(run, index, shard, true)
        outcome = 'queued'
      end
      save_shard(run, index, shard)
      if outcome == 'failed' then end_run_if_finished(run) end
      table.insert(out, member)
      table.insert(out, outcome)
    end
  end
end
return out
