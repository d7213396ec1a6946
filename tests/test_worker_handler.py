"""A worker's message handling and heartbeat, in process: fakeredis with Lua, a tiny model, real files."""

from __future__ import annotations

import time

import fakeredis
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardgen.schemas.layout import RunLayout
from shardgen.schemas.model import ModelSpec
from shardgen.schemas.results import decode_metadata
from shardgen.schemas.run import RunSpec
from shardgen.schemas.sampling import SamplingParams
from shardgen.schemas.states import Outcome, RunState
from shardgen.workers.generators import make_generator
from shardgen.workers.lifecycle import RunStore
from shardgen.workers.queue.doorbell import Doorbell
from shardgen.workers.queue.handler import Shutdown, WorkerContext, handle_message, watchdog_tick
from shardgen.workers.queue.heartbeat import Heartbeat
from shardgen.workers.storage import stage_input, write_run_file
from tests.conftest import EngineWrapper
from tests.test_lifecycle import Clock, CountingWakeups


class Blocking(EngineWrapper):
    """The real engine, but each call first runs `on_start` (what happens while the shard runs), then waits (on
    a condition, with a deadline) until should_stop is true, as a long shard would."""

    def __init__(self, engine, on_start):
        super().__init__(engine)
        self.on_start = on_start

    def generate(self, requests, params, *, on_output=None, should_stop=None):
        self.on_start()
        deadline = time.monotonic() + 20
        while not should_stop():
            assert time.monotonic() < deadline, "should_stop never turned true"
            time.sleep(0.01)
        return self.engine.generate(requests, params, on_output=on_output, should_stop=should_stop)


@pytest.fixture()
def clock():
    return Clock(time.time())


@pytest.fixture()
def world(tmp_path, tiny_model_dir, tiny_loaded, clock):
    """A run of 3 shards of 4 rows staged in tmp_path, and a worker context for the tiny model."""
    store = RunStore(client=fakeredis.FakeRedis(), clock=clock)
    model = ModelSpec(model=str(tiny_model_dir))
    spec = RunSpec(input="mem", model=model, params=SamplingParams(max_new_tokens=3), shard_size=4, max_retries=1)
    table = pa.table({"prompt": [f"Tell me about river {i}." for i in range(12)]})
    layout = RunLayout(str(tmp_path / "work"), spec.run_id, spec.shard_size)
    stage_input(layout, table)
    write_run_file(layout, spec, 12, 3)
    store.create_run(spec, layout.work_dir, 12, 3)
    wakeups = CountingWakeups()
    ctx = WorkerContext(
        loaded=tiny_loaded, generator=make_generator(tiny_loaded, 4), store=store, doorbell=Doorbell(store, wakeups),
        queue=model.queue, device="cpu", worker_id="w1", lease_ms=500, shutdown=Shutdown(0.2), shards_in_flight=1,
    )
    return ctx, spec, layout


def message(ctx):
    return {"queue": ctx.queue}


def test_a_message_runs_the_next_shard_and_publishes_its_result(world):
    ctx, spec, layout = world
    assert handle_message(message(ctx), ctx) == "done"
    record = ctx.store.record(spec.run_id)
    assert record.shards["done"] == 1 and record.rows_done == 4 and record.generated_tokens == 12
    table = pq.read_table(layout.part(0))
    assert table.column("row_index").to_pylist() == [0, 1, 2, 3]
    meta = decode_metadata(table.schema.metadata)
    assert meta["attempt"] == "1" and meta["worker"] == "w1"
    assert ctx.store.shards(spec.run_id, [0])[0].result.endswith(".parquet")
    assert ctx.doorbell.bell.sent == 2  # two more shards were waiting: two more workers woken


@pytest.mark.parametrize(
    "payload",
    [None, "not a shard", {"queue": "sg.q.other-model"}, {"queue": "x", "run_id": "r"}, {"queue": "../../etc/passwd"}],
)
def test_malformed_foreign_and_misrouted_messages_are_rejected_without_touching_state(world, payload):
    ctx, spec, _ = world
    assert handle_message(payload, ctx) == "rejected"
    assert ctx.store.record(spec.run_id).shards["queued"] == 3


def test_a_failing_shard_is_retried_after_backoff_then_failed_for_good(world, clock):
    ctx, spec, layout = world
    import os

    os.unlink(layout.input_block(0))  # every shard's staged input is now unreadable
    assert handle_message(message(ctx), ctx) == "retry"
    assert handle_message(message(ctx), ctx) == "retry"  # the next shard fails too
    clock.advance(60)
    assert handle_message(message(ctx), ctx) == "failed"
    record = ctx.store.record(spec.run_id)
    assert record.retries == 2 and record.shards["failed"] == 1
    assert "does not exist" in record.failed[0].error


def test_heartbeat_renews_publishes_progress_and_notices_cancel_and_takeover(world, clock):
    ctx, spec, _ = world
    claim = ctx.store.claim_next(ctx.queue, "w1", lease_ms=500)
    beat = Heartbeat(ctx.store, claim, lease_ms=500)
    beat.rows_done = 3
    beat.beat()
    assert ctx.store.redis.pttl(ctx.store.lease_key(spec.run_id, 0)) > 0
    assert ctx.store.shards(spec.run_id, [0])[0].rows_done == 3 and not beat.should_stop()
    ctx.store.cancel(spec.run_id)
    beat.beat()
    assert beat.should_stop() and beat.stop_reason == "cancelled"

    taken = Heartbeat(ctx.store, claim, lease_ms=500)
    ctx.store.redis.set(ctx.store.lease_key(spec.run_id, 0), "w2")  # the lease ran out and another took it
    taken.beat()
    assert taken.should_stop() and taken.stop_reason == "lost"


def test_a_lease_that_ran_out_with_nobody_taking_the_shard_is_taken_back(world, clock):
    """Redis away (or paused) for longer than a lease: the attempt goes on, and no death is counted."""
    ctx, spec, _ = world
    claim = ctx.store.claim_next(ctx.queue, "w1", lease_ms=500)
    beat = Heartbeat(ctx.store, claim, lease_ms=500)
    ctx.store.redis.delete(ctx.store.lease_key(spec.run_id, 0))  # ran out; no reaper has run since
    beat.beat()
    assert not beat.should_stop() and ctx.store.redis.get(ctx.store.lease_key(spec.run_id, 0)) == b"w1"
    record = ctx.store.record(spec.run_id)
    assert record.reacquired == 1 and record.reassigned == 0 and record.shards["running"] == 1


def test_shutdown_gives_the_running_shard_back_at_once_after_the_grace(world):
    ctx, spec, _ = world
    ctx.shutdown.request()  # as SIGTERM does
    assert handle_message(message(ctx), ctx) == "draining"  # no new shard once shutting down
    # A shard already running when the signal comes: it stops after the grace and goes back to the front.
    ctx.shutdown = Shutdown(0.2)
    ctx.generator = Blocking(ctx.generator, on_start=ctx.shutdown.request)
    assert handle_message(message(ctx), ctx) == "released"
    record = ctx.store.record(spec.run_id)
    assert record.shards["queued"] == 3 and record.shards["running"] == 0 and record.retries == 0
    claim = ctx.store.claim_next(ctx.queue, "w2")
    assert (claim.shard_index, claim.attempt) == (0, 2)


def test_a_shard_taken_over_stops_and_its_attempt_is_not_published(world, tmp_path):
    ctx, spec, layout = world

    def steal():  # the lease runs out while the shard runs (this worker stalled); another takes it
        ctx.store.redis.set(ctx.store.lease_key(spec.run_id, 0), "w2")

    ctx.generator = Blocking(ctx.generator, on_start=steal)
    assert handle_message(message(ctx), ctx) == "lost"
    assert not (tmp_path / "work" / spec.run_id / "part-00000.parquet").exists()


def test_a_late_duplicate_discards_its_own_object(world, tmp_path):
    ctx, spec, layout = world
    original = ctx.store.complete
    ctx.store.complete = lambda claim, *args, **kwargs: Outcome.DUPLICATE  # another attempt was recorded first
    assert handle_message(message(ctx), ctx) == "duplicate"
    ctx.store.complete = original
    attempts = tmp_path / "work" / spec.run_id / "attempts"
    assert not list(attempts.glob("*.parquet")) and not (tmp_path / "work" / spec.run_id / "part-00000.parquet").exists()


def test_watchdog_reaps_dead_workers_shards_wakes_and_reports_this_worker(world, clock):
    ctx, spec, _ = world
    dead = ctx.store.claim_next(ctx.queue, "dead", lease_ms=500)
    ctx.store.redis.delete(ctx.store.lease_key(spec.run_id, dead.shard_index))
    clock.advance(5)
    watchdog_tick(ctx)
    record = ctx.store.record(spec.run_id)
    assert record.reassigned == 1 and record.shards["queued"] == 3 and record.state is RunState.RUNNING
    assert ctx.doorbell.bell.sent == 3
    assert [w.worker for w in ctx.store.workers()] == ["w1"]


def test_the_alive_file_is_touched_while_the_worker_progresses_and_not_once_it_stalls(world, tmp_path):
    from shardgen.workers.queue.health import Health

    ctx, spec, _ = world
    alive = tmp_path / "alive"
    ctx.health = Health(stall_s=0.3, alive_file=str(alive))
    watchdog_tick(ctx)
    assert alive.exists()
    claim = ctx.store.claim_next(ctx.queue, "w1", lease_ms=500)
    ctx.health.heartbeat = Heartbeat(ctx.store, claim, lease_ms=500, stall_s=0.3)
    alive.unlink()
    watchdog_tick(ctx)
    assert alive.exists()
    alive.unlink()
    ctx.health.heartbeat.last_progress -= 1  # no token, no row for longer than stall_s
    watchdog_tick(ctx)
    assert not alive.exists()


def test_a_run_for_other_weights_in_this_workers_queue_is_never_served(world, tmp_path):
    """What a queue name cannot catch (a run recorded by an older shardgen under the same name): the worker
    compares the run's weights with its own on claim, and generates nothing."""
    ctx, spec, _ = world
    ctx.serves = ModelSpec(model=spec.model.model, quantization_config={"bnb_4bit_use_double_quant": True},
                           quantize="nf4")
    assert handle_message(message(ctx), ctx) == "retry"
    record = ctx.store.record(spec.run_id)
    assert record.retries == 1 and record.worker_faults == 0
    (shard,) = ctx.store.shards(spec.run_id, [0])
    assert "holds other weights (quantize nf4, the run wants none; quantization_config" in shard.error
    assert f"start `shardgen worker --model {spec.model.model}`" in shard.error
    assert not list((tmp_path / "work" / spec.run_id).glob("attempts/*.parquet"))
    ctx.serves = spec.model
    ctx.store.clock.advance(60)
    assert handle_message(message(ctx), ctx) == "done"  # the same weights: served


def test_shards_in_flight_join_the_running_batch_and_each_completes_on_its_own(world):
    """With two shards in flight, one message runs the whole queue in one engine call: each shard is claimed while
    the one before drains, keeps its own lease, and is completed and published as its own result, every row once."""
    ctx, spec, layout = world
    ctx.shards_in_flight = 2
    completed = []
    original = ctx.store.complete
    ctx.store.complete = lambda claim, *a, **k: completed.append((claim.shard_index, ctx.store.record(spec.run_id).shards["running"])) or original(claim, *a, **k)
    calls = []
    engine_generate = ctx.generator.generate
    ctx.generator.generate = lambda *a, **k: calls.append(1) or engine_generate(*a, **k)
    assert handle_message(message(ctx), ctx) == "done"
    record = ctx.store.record(spec.run_id)
    assert record.state is RunState.DONE and record.shards["done"] == 3 and record.rows_done == 12
    assert [index for index, _ in completed] == [0, 1, 2] and len(calls) == 1
    assert max(running for _, running in completed) == 2  # the next shard was claimed before the last completed
    for index in range(3):
        rows = pq.read_table(layout.part(index)).column("row_index").to_pylist()
        assert rows == list(range(4 * index, 4 * index + 4))


def test_shards_in_flight_give_the_same_rows_as_one_at_a_time(world, clock):
    ctx, spec, layout = world
    column = spec.columns.output_column

    def texts():
        return [pq.read_table(layout.part(i)).column(column).to_pylist() for i in range(3)]

    ctx.shards_in_flight = 2
    assert handle_message(message(ctx), ctx) == "done"
    in_flight = texts()
    ctx.store = RunStore(client=fakeredis.FakeRedis(), clock=clock)  # the same run again, one shard at a time
    ctx.store.create_run(spec, layout.work_dir, 12, 3)
    ctx.shards_in_flight = 1
    assert [handle_message(message(ctx), ctx) for _ in range(3)] == ["done"] * 3
    assert texts() == in_flight and all(len(t) == 4 for t in in_flight)
