"""The life of a run and its shards: states, the Redis key layout, every transition, retries and reaping."""
