"""The run lifecycle in process: every transition and race of workers/lifecycle against fakeredis (with Lua).

Each test drives the store as workers, reapers and the CLI would, with a clock the test moves, and checks the
records and the per-state counters after. The same scripts run against a real redis-server in the thin
integration layer (test_distributed.py, test_faults.py).
"""

from __future__ import annotations

import fakeredis
import pytest

from shardgen.schemas.model import ModelSpec
from shardgen.schemas.run import RunSpec
from shardgen.schemas.states import Fault, RunState
from shardgen.workers.lifecycle import RunStore, run_status
from shardgen.workers.queue.doorbell import WAKE_WINDOW, Doorbell
from shardgen.workers.lifecycle.policy import retry_delay

QUEUE = "sg.q.tiny"


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingWakeups:
    """Wake-ups a test can count; a worker 'receives' one with take()."""

    def __init__(self):
        self.pending = {}
        self.sent = 0

    def waiting(self, queue):
        return self.pending.get(queue, 0)

    def send(self, queue, count):
        self.pending[queue] = self.pending.get(queue, 0) + count
        self.sent += count

    def take(self, queue):
        self.pending[queue] -= 1


@pytest.fixture()
def clock():
    return Clock()


@pytest.fixture()
def store(clock):
    return RunStore(client=fakeredis.FakeRedis(), clock=clock)


def new_run(store, shards=4, shard_size=10, max_retries=2):
    spec = RunSpec(input="in.jsonl", model=ModelSpec(model="tiny"), shard_size=shard_size, max_retries=max_retries)
    queue = store.create_run(spec, "/work", rows_total=shards * shard_size, shards_total=shards)
    assert queue == QUEUE
    return spec.run_id


def stats(rows=10, tokens=5):
    return dict(rows=rows, rows_failed=0, prompt_tokens=3 * rows, generated_tokens=tokens, seconds=1.0)


def counters(store, run_id):
    record = store.record(run_id)
    return record.state, {state: n for state, n in record.shards.items() if n}


def expire_lease(store, claim, clock):
    """What a killed worker leaves: its lease runs out, while the rest of the fleet goes on talking to Redis."""
    store.redis.delete(store.lease_key(claim.run_id, claim.shard_index))
    clock.advance(60)
    peers_were_alive(store, clock)


def peers_were_alive(store, clock):
    """What live workers' watchdogs leave behind: Redis heard from the fleet just now (no outage)."""
    store.redis.set(f"{store.prefix}:seen", clock.now)


# ---------------------------------------------------------------- claim
def test_shards_are_claimed_in_order_once_each_then_the_queue_is_empty(store):
    run_id = new_run(store, shards=3)
    claims = [store.claim_next(QUEUE, f"w{i}") for i in range(4)]
    assert [(c.run_id, c.shard_index, c.attempt) for c in claims[:3]] == [(run_id, i, 1) for i in range(3)]
    assert claims[3] is None
    assert counters(store, run_id) == (RunState.RUNNING, {"running": 3})
    assert sorted(s.shard_index for s in claims[:3]) == [s.index for s in store.record(run_id).running]


def test_double_claim_a_second_entry_for_a_claimed_shard_is_dropped(store):
    run_id = new_run(store, shards=1)
    first = store.claim_next(QUEUE, "w1")
    store.redis.rpush(QUEUE, f"{run_id}|0|1")  # the same entry again: a redelivery, a bug, an operator
    assert store.claim_next(QUEUE, "w2") is None
    assert store.shards(run_id)[0].worker == "w1" and first.worker == "w1"
    assert counters(store, run_id)[1] == {"running": 1}


def test_entries_of_earlier_attempts_are_stale(store, clock):
    run_id = new_run(store, shards=1)
    claim = store.claim_next(QUEUE, "w1")
    store.release(claim, "shutdown")  # back at the front, attempt 2
    store.redis.rpush(QUEUE, f"{run_id}|0|1")  # an old entry of attempt 1
    again = store.claim_next(QUEUE, "w2")
    assert (again.shard_index, again.attempt) == (0, 2)
    assert store.claim_next(QUEUE, "w3") is None  # the attempt-1 entry was dropped, not run


# ---------------------------------------------------------------- complete
def test_duplicate_completion_counts_its_rows_once(store, clock):
    run_id = new_run(store, shards=2)
    claim = store.claim_next(QUEUE, "w1")
    assert store.complete(claim, "obj-a", **stats(rows=10, tokens=7)) == "done"
    assert store.complete(claim, "obj-b", **stats(rows=10, tokens=7)) == "duplicate"
    record = store.record(run_id)
    assert (record.rows_done, record.generated_tokens, record.shards["done"]) == (10, 7, 1)
    assert store.shards(run_id, [0])[0].result == "obj-a"


def test_the_same_completion_sent_twice_is_recorded_once_and_answered_done_twice(store, clock):
    """redis-py sends a script again after a lost reply: the second send must not tell the worker it lost (the
    worker would then delete its own recorded result)."""
    run_id = new_run(store, shards=2)
    claim = store.claim_next(QUEUE, "w1")
    assert store.complete(claim, "obj-a", **stats(rows=10, tokens=7)) == "done"
    assert store.complete(claim, "obj-a", **stats(rows=10, tokens=7)) == "done"
    record = store.record(run_id)
    assert (record.rows_done, record.generated_tokens, record.shards["done"]) == (10, 7, 1)


def test_a_slow_attempt_and_its_takeover_the_first_to_finish_wins(store, clock):
    run_id = new_run(store, shards=1)
    slow = store.claim_next(QUEUE, "slow")
    expire_lease(store, slow, clock)
    assert store.reap_expired_leases() == [(run_id, 0, "queued")]
    fast = store.claim_next(QUEUE, "fast")
    assert fast.attempt == 2
    assert store.complete(slow, "slow-object", **stats()) == "done"  # the slow one was not dead after all
    assert store.renew(fast) == "lost"  # the takeover learns at its next renewal and stops
    assert store.complete(fast, "fast-object", **stats()) == "duplicate"
    assert store.fail(fast, "stopped") == ("stale", 0.0)
    assert counters(store, run_id) == (RunState.DONE, {"done": 1})
    assert store.shards(run_id)[0].result == "slow-object" and store.record(run_id).rows_done == 10


def test_complete_after_a_final_failure_makes_the_shard_and_the_run_done(store, clock):
    run_id = new_run(store, shards=1, max_retries=0)
    stuck = store.claim_next(QUEUE, "w1")
    expire_lease(store, stuck, clock)
    store.reap_expired_leases()
    retry = store.claim_next(QUEUE, "w2")
    assert store.fail(retry, "boom") == ("failed", 0.0)
    assert counters(store, run_id) == (RunState.FAILED, {"failed": 1})
    assert store.complete(stuck, "late-object", **stats()) == "done"
    assert counters(store, run_id) == (RunState.DONE, {"done": 1})
    assert store.record(run_id).failed == []


# ---------------------------------------------------------------- fail and retry
def test_a_failure_is_retried_after_its_backoff_without_any_message(store, clock):
    """fail() moves the shard back into its queue in the same step: no second call (a message) can be lost."""
    run_id = new_run(store, shards=1, max_retries=2)
    claim = store.claim_next(QUEUE, "w1")
    assert store.fail(claim, "RuntimeError: boom") == ("retry", retry_delay(1))
    assert store.claim_next(QUEUE, "w2") is None  # still in its backoff
    assert store.due_count(QUEUE) == 0 and store.queue_depth(QUEUE) == {"waiting": 0, "backoff": 1}
    clock.advance(retry_delay(1))
    assert store.due_count(QUEUE) == 1
    again = store.claim_next(QUEUE, "w2")
    assert (again.shard_index, again.attempt) == (0, 2)
    assert store.fail(again, "boom") == ("retry", retry_delay(2))
    clock.advance(retry_delay(2))
    third = store.claim_next(QUEUE, "w3")
    assert store.fail(third, "boom again") == ("failed", 0.0)
    record = store.record(run_id)
    assert record.state is RunState.FAILED and record.retries == 2
    assert [(s.index, s.error) for s in record.failed] == [(0, "boom again")]


def test_a_crashed_claim_is_reaped_exactly_once_under_two_reapers(store, clock):
    run_id = new_run(store, shards=2)
    lost = store.claim_next(QUEUE, "dead")
    alive = store.claim_next(QUEUE, "alive")
    expire_lease(store, lost, clock)
    store.renew(alive)  # the live worker renews; its lease survives the clock jump
    first, second = store.reap_expired_leases(), store.reap_expired_leases()
    assert first == [(run_id, 0, "queued")] and second == []
    record = store.record(run_id)
    assert record.reassigned == 1 and record.shards["queued"] == 1 and record.shards["running"] == 1
    assert store.claim_next(QUEUE, "new").shard_index == 0  # at the front of the queue


def test_a_shard_whose_workers_keep_dying_fails(store, clock):
    run_id = new_run(store, shards=1, max_retries=1)
    for _ in range(2):
        expire_lease(store, store.claim_next(QUEUE, "w"), clock)
        assert store.reap_expired_leases()[0][2] == "queued"
    expire_lease(store, store.claim_next(QUEUE, "w"), clock)
    assert store.reap_expired_leases() == [(run_id, 0, "failed")]
    assert "died 3 times" in store.record(run_id).failed[0].error


# ---------------------------------------------------------------- cancel
def test_cancel_racing_complete_never_overwrites_done(store):
    run_id = new_run(store, shards=1)
    claim = store.claim_next(QUEUE, "w1")
    store.complete(claim, "obj", **stats())
    assert store.cancel(run_id) is RunState.DONE  # it had already ended (done): nothing changes
    assert counters(store, run_id) == (RunState.DONE, {"done": 1})


def test_cancel_stops_queued_shards_and_running_ones_at_their_next_renewal(store):
    run_id = new_run(store, shards=3)
    running = store.claim_next(QUEUE, "w1")
    assert store.cancel(run_id) is None
    assert counters(store, run_id) == (RunState.CANCELLED, {"running": 1, "cancelled": 2})
    assert store.claim_next(QUEUE, "w2") is None
    assert store.renew(running) == "cancelled"
    assert store.release(running, "cancelled") == "cancelled"
    assert counters(store, run_id) == (RunState.CANCELLED, {"cancelled": 3})
    assert store.cancel(run_id) is RunState.CANCELLED  # already ended, cancelled


def test_a_shard_finishing_after_cancel_still_counts_and_retry_finishes_the_rest(store):
    run_id = new_run(store, shards=3)
    claim = store.claim_next(QUEUE, "w1")
    store.cancel(run_id)
    assert store.complete(claim, "obj", **stats()) == "done"  # its rows are valid
    assert counters(store, run_id) == (RunState.CANCELLED, {"done": 1, "cancelled": 2})
    assert store.redo(run_id) == 2
    assert counters(store, run_id) == (RunState.RUNNING, {"done": 1, "queued": 2})
    for _ in range(2):
        store.complete(store.claim_next(QUEUE, "w2"), "obj", **stats())
    assert store.claim_next(QUEUE, "w2") is None
    record = store.record(run_id)
    assert record.state is RunState.DONE and record.rows_done == 30


# ---------------------------------------------------------------- resume
def test_counters_after_resume_take_back_the_redone_shards(store):
    run_id = new_run(store, shards=3)
    for _ in range(3):
        store.complete(store.claim_next(QUEUE, "w"), "obj", **stats(rows=10, tokens=4))
    assert store.record(run_id).state is RunState.DONE
    assert store.redo(run_id, missing_results=[1]) == 1  # shard 1's result was lost
    record = store.record(run_id)
    assert record.state is RunState.RUNNING and (record.rows_done, record.generated_tokens) == (20, 8)
    redo = store.claim_next(QUEUE, "w")
    assert (redo.shard_index, redo.attempt) == (1, 2)
    store.complete(redo, "obj2", **stats(rows=10, tokens=4))
    record = store.record(run_id)
    assert record.state is RunState.DONE and (record.rows_done, record.generated_tokens) == (30, 12)
    assert record.shards == {"queued": 0, "running": 0, "done": 3, "failed": 0, "cancelled": 0}


def test_redo_leaves_running_and_waiting_shards_alone(store):
    run_id = new_run(store, shards=3)
    store.claim_next(QUEUE, "w")
    assert store.redo(run_id) == 0
    assert store.redis.llen(QUEUE) == 2


# ---------------------------------------------------------------- wake-ups and status
def test_wakeups_are_topped_up_to_what_is_takeable_within_a_window(store, clock):
    wakeups = CountingWakeups()
    doorbell = Doorbell(store, wakeups)
    new_run(store, shards=3)
    assert doorbell.ring(QUEUE) == 3
    assert doorbell.ring(QUEUE) == 0  # three already in flight
    new_run(store, shards=WAKE_WINDOW * 2)
    assert doorbell.ring(QUEUE) == WAKE_WINDOW - 3
    wakeups.take(QUEUE)
    assert doorbell.ring(QUEUE) == 1


def test_status_reads_counters_and_the_running_shards_progress(store, clock):
    run_id = new_run(store, shards=4, shard_size=10)
    claim = store.claim_next(QUEUE, "w1")
    store.renew(claim, rows_done=4)
    store.complete(store.claim_next(QUEUE, "w2"), "obj", **stats(rows=10, tokens=20))
    clock.advance(10)
    status = run_status(store.record(run_id), clock(), queue_depth=store.queue_depth(QUEUE))
    assert (status["rows_done"], status["rows_in_progress"], status["rows_total"]) == (10, 4, 40)
    assert (status["shards_done"], status["shards_running"], status["shards_queued"]) == (1, 1, 2)
    assert status["running_shards"] == [{"shard": 0, "worker": "w1", "rows_done": 4, "attempt": 1}]
    assert status["queue_depth"] == {"waiting": 2, "backoff": 0}
    assert status["tokens_per_second"] == 2.0 and status["eta_s"] == pytest.approx(26 / 1.4, abs=0.05)


def test_redis_holds_metadata_not_rows(store):
    """Queuing a shard costs an entry in its queue; nothing per row."""
    small, large = new_run(store, shards=10, shard_size=10), new_run(store, shards=10, shard_size=10_000)
    assert store.record(small).rows_total == 100 and store.record(large).rows_total == 100_000
    keys = {k.decode() for k in store.redis.keys("*")}
    assert keys == {"sg:runs", QUEUE, f"sg:run:{small}", f"sg:run:{large}"}


# ---------------------------------------------------------------- whose fault
def test_a_worker_fault_sends_the_shard_to_another_worker_and_spends_no_retry(store, clock):
    run_id = new_run(store, shards=2, max_retries=0)
    sick = store.claim_next(QUEUE, "sick")
    assert store.fail(sick, "the device failed", Fault.WORKER) == ("retry", 0.0)  # no backoff: at once, elsewhere
    assert store.claim_next(QUEUE, "healthy").shard_index == 1  # back at the end of the queue
    again = store.claim_next(QUEUE, "healthy")
    assert (again.shard_index, again.attempt) == (0, 2)
    record = store.record(run_id)
    assert record.worker_faults == 1 and record.retries == 0 and store.shards(run_id, [0])[0].failures == 0
    for _ in range(2 * (0 + 1) - 1):  # a shard that faults every worker ends, after 2 * (max_retries + 1) retries
        assert store.fail(again, "the device failed", Fault.WORKER)[0] == "retry"
        again = store.claim_next(QUEUE, "another")
    assert store.fail(again, "the device failed", Fault.WORKER) == ("failed", 0.0)
    assert "faulted 3 times" in store.record(run_id).failed[0].error


def test_storage_errors_back_off_for_minutes_before_they_spend_a_retry(store, clock):
    from shardgen.workers.lifecycle.store import STORAGE_PATIENCE_S

    run_id = new_run(store, shards=1, max_retries=0)
    delays = []
    while clock.now < 1_000_000 + STORAGE_PATIENCE_S:
        claim = store.claim_next(QUEUE, "w")
        outcome, delay = store.fail(claim, "cannot read s3://b/x: EndpointConnectionError", Fault.STORAGE)
        assert outcome == "retry", f"failed after {clock.now - 1_000_000:.0f}s of storage errors"
        delays.append(delay)
        clock.advance(delay)
    assert delays[:4] == [retry_delay(1), retry_delay(2), retry_delay(3), retry_delay(4)] and max(delays) == 60
    assert store.fail(store.claim_next(QUEUE, "w"), "still down", Fault.STORAGE) == ("failed", 0.0)
    record = store.record(run_id)
    assert record.retries == 0 and record.storage_errors == len(delays) + 1


def test_retry_redoes_shards_with_failed_rows_and_resume_does_not(store, clock):
    run_id = new_run(store, shards=2)
    for claim in (store.claim_next(QUEUE, "w"), store.claim_next(QUEUE, "w")):
        store.complete(claim, f"obj-{claim.shard_index}", **{**stats(), "rows_failed": 3 * claim.shard_index})
    assert store.record(run_id).rows_failed == 3
    assert store.redo(run_id) == 0  # resume: every shard has its result
    assert store.redo(run_id, failed_rows=True) == 1  # retry: shard 1's failed rows are generated again
    record = store.record(run_id)
    assert record.rows_failed == 0 and record.rows_done == 10 and record.shards["queued"] == 1
    assert store.claim_next(QUEUE, "w").shard_index == 1


def test_leases_that_ran_out_while_redis_was_away_are_not_reaped_as_deaths(store, clock):
    run_id = new_run(store, shards=2)
    first, second = store.claim_next(QUEUE, "w1"), store.claim_next(QUEUE, "w2")
    store.renew(first)
    store.reap_expired_leases()  # the watchdogs reap every few seconds, up to the outage
    store.redis.delete(store.lease_key(run_id, 0), store.lease_key(run_id, 1))
    clock.advance(120)  # nobody reached Redis for two minutes: every lease ran out meanwhile
    assert store.reap_expired_leases() == []  # an outage, not two deaths
    assert store.renew(first) == RunState.RUNNING  # its worker takes its lease back
    clock.advance(1)
    assert store.reap_expired_leases() == []  # one more lease for the other...
    clock.advance(store_lease_s())
    store.renew(first)  # the live worker went on renewing meanwhile, and the watchdogs on reaping
    peers_were_alive(store, clock)
    assert store.reap_expired_leases() == [(run_id, 1, "queued")]  # ...whose worker did die
    record = store.record(run_id)
    assert record.reassigned == 1 and record.reacquired == 1 and record.shards["running"] == 1


def test_an_outage_is_seen_even_when_a_renewal_reaches_redis_before_any_reap(store, clock):
    run_id = new_run(store, shards=2)
    first, second = store.claim_next(QUEUE, "w1"), store.claim_next(QUEUE, "w2")
    store.reap_expired_leases()
    store.redis.delete(store.lease_key(run_id, 0), store.lease_key(run_id, 1))
    clock.advance(120)
    assert store.renew(first) == RunState.RUNNING  # w1's renewal happens to be served first after the outage
    assert store.reap_expired_leases() == []  # w2's lease is not reaped as a death...
    assert store.renew(second) == RunState.RUNNING  # ...and w2 takes it back
    assert store.record(run_id).reassigned == 0 and store.record(run_id).reacquired == 2


def store_lease_s():
    from shardgen.workers.lifecycle.store import LEASE_MS

    return LEASE_MS / 1000


# ---------------------------------------------------------------- large runs
def test_cancel_and_retry_walk_a_run_in_bounded_steps(store, monkeypatch):
    from shardgen.workers.lifecycle import store as store_module

    monkeypatch.setattr(store_module, "STEP", 3)  # 10 shards: four steps each
    calls = []
    original = store._run
    monkeypatch.setattr(store, "_run", lambda name, *args: calls.append(name) or original(name, *args))
    run_id = new_run(store, shards=10)
    done = store.claim_next(QUEUE, "w")
    store.complete(done, "obj", **stats())
    running = store.claim_next(QUEUE, "w")
    assert store.cancel(run_id) is None and calls.count("cancel") == 4
    assert counters(store, run_id) == (RunState.CANCELLED, {"done": 1, "running": 1, "cancelled": 8})
    assert store.release(running, "cancelled") == "cancelled"
    assert store.redo(run_id) == 9 and calls.count("redo") == 4
    assert counters(store, run_id) == (RunState.RUNNING, {"done": 1, "queued": 9})
    assert [store.claim_next(QUEUE, "w").shard_index for _ in range(9)] == list(range(1, 10))


def test_a_finished_run_expires_retry_keeps_it_and_gc_removes_it(store, clock):
    run_id = new_run(store, shards=1)
    claim = store.claim_next(QUEUE, "w")
    assert store.redis.ttl(store.run_key(run_id)) == -1  # a running run never expires
    store.complete(claim, "obj", **{**stats(), "rows_failed": 1})
    assert 0 < store.redis.ttl(store.run_key(run_id)) <= 30 * 86400
    assert 0 < store.redis.ttl(store.shards_key(run_id)) <= 30 * 86400
    assert store.redo(run_id, failed_rows=True) == 1 and store.redis.ttl(store.run_key(run_id)) == -1
    store.complete(store.claim_next(QUEUE, "w"), "obj2", **stats())
    assert store.finished_before(clock.now - 60) == []
    clock.advance(120)
    assert store.finished_before(clock.now - 60) == [(run_id, "/work")]
    store.remove_run(run_id)
    assert store.run_ids() == [] and not store.redis.exists(store.run_key(run_id), store.shards_key(run_id))
    assert store.complete(claim, "late", **stats()) == "stale"  # a late attempt recreates nothing
    assert not store.redis.exists(store.run_key(run_id))


def test_status_lists_a_bounded_number_of_failed_shards_and_counts_them_all(store, monkeypatch):
    from shardgen.workers.lifecycle import store as store_module

    monkeypatch.setattr(store_module, "DETAILS_LIMIT", 2)
    run_id = new_run(store, shards=5, max_retries=0)
    for _ in range(5):
        store.fail(store.claim_next(QUEUE, "w"), "boom")
    record = store.record(run_id)
    assert record.shards["failed"] == 5 and len(record.failed) == 2
