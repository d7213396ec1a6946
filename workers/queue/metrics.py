"""Prometheus metrics of one worker process, served over HTTP (`--metrics-port`) once its model is loaded."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from shardgen.schemas.states import Outcome

from ..lifecycle.store import Claim

SHARD_SECONDS_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class WorkerMetrics:
    def __init__(self, *, model: str, device: str, queue: str, worker: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.shards = Counter("shardgen_shards", "Shards this worker ended, by outcome (schemas/states.py Outcome): "
                              "done, duplicate, retry, failed, released, lost, cancelled, stale", ["outcome"], registry=r)
        self.rows = Counter("shardgen_rows", "Input rows of the shards this worker completed", registry=r)
        self.rows_failed = Counter("shardgen_rows_failed", "Rows recorded with an error (bad prompt, too long, ...)", registry=r)
        self.prompt_tokens = Counter("shardgen_prompt_tokens", "Prompt tokens of completed shards", registry=r)
        self.generated_tokens = Counter("shardgen_generated_tokens", "Tokens generated in completed shards", registry=r)
        self.tokens_per_second = Gauge("shardgen_tokens_per_second", "Generated tokens per second of the last shard", registry=r)
        self.batch_occupancy = Gauge("shardgen_batch_occupancy", "Share of the batch's slots that decoded, last shard", registry=r)
        self.shard_seconds = Histogram("shardgen_shard_seconds", "Seconds per completed shard", buckets=SHARD_SECONDS_BUCKETS, registry=r)
        self.model_load_seconds = Gauge("shardgen_model_load_seconds", "Seconds this worker took to load its model", registry=r)
        self.busy = Gauge("shardgen_busy", "Shards this worker is running (up to --shards-in-flight)", registry=r)
        self.engine_slot_steps = Gauge("shardgen_engine_slot_steps", "Batch slots the engine has offered per decode "
                                       "step, summed since start (over decoded tokens: its occupancy)", registry=r)
        self.engine_decode_steps = Gauge("shardgen_engine_decode_steps", "Decode steps the engine has run since start",
                                         registry=r)
        self.engine_decode_tokens = Gauge("shardgen_engine_decode_tokens", "Tokens the engine has decoded since start",
                                          registry=r)
        self.current = Gauge("shardgen_current_shard", "1 for the shard this worker is running", ["run_id", "shard"], registry=r)
        Info("shardgen_worker", "What this worker serves", registry=r).info(
            {"model": model, "device": device, "queue": queue, "worker": worker})

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        start_http_server(port, addr=address, registry=self.registry)

    def shard_started(self, claim: Claim) -> None:
        self.busy.inc()
        self.current.labels(claim.run_id, str(claim.shard_index)).set(1)

    def engine_totals(self, stats: Any) -> None:
        """The engine's counters since the worker started (EngineStats), for occupancy across shards."""
        self.engine_slot_steps.set(stats.slot_steps)
        self.engine_decode_tokens.set(stats.decode_tokens)
        self.engine_decode_steps.set(stats.decode_steps)

    def shard_ended(self, claim: Claim, outcome: Outcome, result: Any = None, occupancy: float | None = None) -> None:
        """`result` is the ShardOutcome of a completed shard; `occupancy` the engine's over it."""
        self.busy.dec()
        self.current.remove(claim.run_id, str(claim.shard_index))
        self.shards.labels(outcome.value).inc()
        if result is None:
            return
        self.rows.inc(result.rows)
        self.rows_failed.inc(result.rows_failed)
        self.prompt_tokens.inc(result.prompt_tokens)
        self.generated_tokens.inc(result.generated_tokens)
        self.shard_seconds.observe(result.seconds)
        if result.seconds > 0:
            self.tokens_per_second.set(result.generated_tokens / result.seconds)
        if occupancy is not None:
            self.batch_occupancy.set(occupancy)
