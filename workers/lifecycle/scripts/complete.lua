-- Record an attempt's result as the shard's result, unless the shard already has one.
-- ARGV: prefix, now, run, index, worker, attempt, result, rows, rows_failed, prompt_tokens, generated_tokens,
-- seconds, batch_halvings. Returns 'done' when this attempt's result is the shard's result (also when this same
-- completion arrives twice: redis-py sends a script again after a lost reply), or 'duplicate' when another
-- attempt's result was recorded first.
local run, index = ARGV[3], ARGV[4]
if redis.call('EXISTS', run_key(run)) == 0 then return 'stale' end  -- the run expired or was removed (gc)
local shard = load_shard(run, index)
if shard.state == 'done' then
  if shard.result == ARGV[7] and shard.result_attempt == tonumber(ARGV[6]) then return 'done' end
  return 'duplicate'
end
-- A duplicate of this shard still running learns at its next lease renewal that it lost.
drop_lease(run, index)
set_state(run, index, shard, 'done')
shard.worker = ARGV[5]
shard.result_attempt = tonumber(ARGV[6])
shard.result = ARGV[7]
shard.rows_done = tonumber(ARGV[8])
shard.rows_failed = tonumber(ARGV[9])
shard.prompt_tokens = tonumber(ARGV[10])
shard.generated_tokens = tonumber(ARGV[11])
shard.seconds = tonumber(ARGV[12])
shard.halvings = tonumber(ARGV[13])
shard.finished_at = now
shard.error = nil
save_shard(run, index, shard)
local key = run_key(run)
redis.call('HINCRBY', key, 'rows_done', ARGV[8])
redis.call('HINCRBY', key, 'rows_failed', ARGV[9])
redis.call('HINCRBY', key, 'prompt_tokens', ARGV[10])
redis.call('HINCRBY', key, 'generated_tokens', ARGV[11])
redis.call('HINCRBY', key, 'halvings', ARGV[13])
end_run_if_finished(run)
return 'done'
