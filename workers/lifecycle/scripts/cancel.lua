-- Cancel a run unless it has ended, in bounded steps. The first call (start 0) cancels the run: from then on no
-- claim takes its shards, and running ones stop at their worker's next lease renewal. Each call also marks the
-- queued shards among [start, start + count) cancelled, so no script walks a million shards at once.
-- ARGV: prefix, now, run, start, count. Returns {outcome, next}: outcome 'cancelled' when the run is (now)
-- cancelled, 'ended:<state>' when it had already ended, or 'missing'; next is where to go on, -1 when done.
local run, start, count = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local key = run_key(run)
local state = redis.call('HGET', key, 'state')
if not state then return {'missing', -1} end
if start == 0 then
  if state == 'done' or state == 'failed' or state == 'cancelled' then return {'ended:' .. state, -1} end
  redis.call('HSET', key, 'state', 'cancelled', 'finished_at', now)
  expire_finished(run)
elseif state ~= 'cancelled' then
  return {'cancelled', -1}  -- retried since: nothing left to sweep
end
local total = tonumber(redis.call('HGET', key, 'shards_total'))
local stop = math.min(start + count, total)
for number = start, stop - 1 do
  local index = tostring(number)
  local shard = load_shard(run, index)
  if shard.state == 'queued' then
    set_state(run, index, shard, 'cancelled')
    save_shard(run, index, shard)
  end
end
return {'cancelled', stop < total and stop or -1}
