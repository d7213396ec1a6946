-- `retry` and `submit --resume`: queue again every shard that has no result and is not running: failed,
-- cancelled, queued shards of a cancelled run (their entries were dropped), done shards whose result
-- object is gone (ARGV[5..]), and with ARGV[4] = '1' (retry) done shards with failed rows. A fresh failure
-- budget for each; their counters are taken back.
-- ARGV: prefix, now, run, redo_failed_rows, missing result indices... Returns how many shards were queued again.
local run = ARGV[3]
local key = run_key(run)
local state = redis.call('HGET', key, 'state')
if not state then return -1 end
local missing = {}
local failed_rows = ARGV[4] == '1'
for i = 5, #ARGV do missing[ARGV[i]] = true end
local requeued = 0
for number = 0, tonumber(redis.call('HGET', key, 'shards_total')) - 1 do
  local index = tostring(number)
  local shard = load_shard(run, index)
  local done_without_result = shard.state == 'done'
    and (missing[index] or (failed_rows and (shard.rows_failed or 0) > 0))
  local redo = shard.state == 'failed' or shard.state == 'cancelled'
    or (shard.state == 'queued' and state == 'cancelled') or done_without_result
  if redo then
    if shard.state == 'done' then
      -- 0 - x, not -x: Lua's -0 becomes the string "-0", which HINCRBY refuses
      for _, counter in ipairs({'rows_done', 'rows_failed', 'prompt_tokens', 'generated_tokens'}) do
        redis.call('HINCRBY', key, counter, 0 - (shard[counter] or 0))
      end
      shard.result = nil
    end
    shard.error = nil
    shard.failures = 0
    shard.reassigned = 0
    shard.faults = 0
    shard.storage_errors = 0
    shard.storage_since = nil
    enqueue(run, index, shard, false)
    save_shard(run, index, shard)
    requeued = requeued + 1
  end
end
if requeued > 0 or state == 'cancelled' then
  local started = redis.call('HGET', key, 'started_at')
  redis.call('HSET', key, 'state', started and 'running' or 'queued')
  redis.call('HDEL', key, 'finished_at')
  end_run_if_finished(run)
end
return requeued
