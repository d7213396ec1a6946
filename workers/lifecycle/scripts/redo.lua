-- `retry` and `submit --resume`, in bounded steps over [start, start + count): queue again every shard that has no
-- result and is not running: failed, cancelled, queued shards of a cancelled run (their entries were dropped),
-- done shards whose result object is gone (ARGV[8..]), and with redo_failed_rows = '1' (retry) done shards with
-- failed rows. A fresh failure budget for each; their counters are taken back.
-- ARGV: prefix, now, run, redo_failed_rows, start, count, was_cancelled ('' on the first step: look), missing
-- result indices... Returns {requeued, next (-1 when done), was_cancelled}, or {-1, -1, ''} for no such run.
local run, start, count = ARGV[3], tonumber(ARGV[5]), tonumber(ARGV[6])
local key = run_key(run)
local state = redis.call('HGET', key, 'state')
if not state then return {-1, -1, ''} end
local was_cancelled = ARGV[7] == '1' or (ARGV[7] == '' and state == 'cancelled')
local failed_rows = ARGV[4] == '1'
local missing = {}
for i = 8, #ARGV do missing[ARGV[i]] = true end
local total = tonumber(redis.call('HGET', key, 'shards_total'))
local stop = math.min(start + count, total)
local requeued = 0
for number = start, stop - 1 do
  local index = tostring(number)
  local shard = load_shard(run, index)
  local done_without_result = shard.state == 'done'
    and (missing[index] or (failed_rows and (shard.rows_failed or 0) > 0))
  local redo = shard.state == 'failed' or shard.state == 'cancelled'
    or (shard.state == 'queued' and was_cancelled) or done_without_result
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
if requeued > 0 or (was_cancelled and start == 0) then
  local started = redis.call('HGET', key, 'started_at')
  redis.call('HSET', key, 'state', started and 'running' or 'queued')
  redis.call('HDEL', key, 'finished_at')
  keep_run(run)
  end_run_if_finished(run)
end
return {requeued, stop < total and stop or -1, was_cancelled and '1' or '0'}
