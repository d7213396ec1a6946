-- Take the next shard waiting in a queue: pop entries until one is current, then lease it to the worker.
-- ARGV: prefix, now, queue, worker, lease_ms, max_pops. Returns {run, index, attempt} or false.
local queue, worker, lease_ms = ARGV[3], ARGV[4], tonumber(ARGV[5])

-- Retries whose backoff has passed go to the front, in the order they came due.
local due = redis.call('ZRANGEBYSCORE', delayed_key(queue), '-inf', now, 'LIMIT', 0, 100)
for i = #due, 1, -1 do
  redis.call('ZREM', delayed_key(queue), due[i])
  redis.call('LPUSH', queue, due[i])
end

for _ = 1, tonumber(ARGV[6]) do
  local entry = redis.call('LPOP', queue)
  if not entry then return false end
  local run, index, attempt = string.match(entry, '^(.+)|(%d+)|(%d+)$')
  if run then
    local state = redis.call('HGET', run_key(run), 'state')
    local shard = load_shard(run, index)
    -- Only the current attempt of a queued shard of a live run runs: any other entry is stale and dropped.
    if (state == 'queued' or state == 'running') and shard.state == 'queued' and shard.attempt == tonumber(attempt) then
      redis.call('SET', lease_key(run, index), worker, 'PX', lease_ms)
      redis.call('ZADD', leases_key, now * 1000 + lease_ms, run .. '|' .. index)
      set_state(run, index, shard, 'running')
      shard.worker = worker
      shard.started_at = now
      shard.rows_done = 0
      save_shard(run, index, shard)
      if state == 'queued' then redis.call('HSET', run_key(run), 'state', 'running', 'started_at', now) end
      return {run, index, attempt}
    end
  end
end
return false
