"""More than one shard in flight on a worker: the next shard joins the engine's running call while the current one
drains, so the batch stays full across shard ends.

Each shard keeps what it has alone: its own lease (a heartbeat of its own), its own attempt file, its own
completion as soon as its last row is in, and its own stop (its run cancelled, its lease lost). A SIGTERM's
deadline stops them all. Should the shared call fail as a whole (out of memory, an exception), each unfinished
shard goes on alone through the one-shard path (`generate_halving_on_oom`), which halves batches and tells a
row's error from the worker's.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from shardgen.schemas.run import RunSpec
from shardgen.schemas.states import Outcome

from ..faults import describe
from ..generation import GenerationCancelled, GenerationOutput, GenerationRequest
from ..lifecycle.store import Claim
from ..shard_processing import PreparedShard, check_adapters, finish_shard, generate_halving_on_oom, prepare_shard
from .heartbeat import Heartbeat

log = logging.getLogger("shardgen.worker")

CLAIM_RETRY_S = 1.0
"""After a claim finds the queue empty, the running call asks again no sooner than this."""


@dataclass
class Flight:
    """One claimed shard while it runs beside others."""

    claim: Claim
    spec: RunSpec
    location: str
    heartbeat: Heartbeat
    prepared: PreparedShard
    stats_before: Any = None
    outputs: dict[int, GenerationOutput] = field(default_factory=dict)
    """Outputs by position in prepared.requests."""
    ended: bool = False

    @property
    def complete(self) -> bool:
        return len(self.outputs) == len(self.prepared.requests)

    def unfinished(self) -> list[int]:
        return [k for k in range(len(self.prepared.requests)) if k not in self.outputs]


def run_in_flight(first: Claim, ctx: Any, *, open_shard: Callable, conclude: Callable, attempt_of: Callable) -> Outcome:
    """Run `first` and, while it drains, the next shards of the queue, up to ctx.shards_in_flight at once.

    open_shard(claim) -> (spec, location, shard, heartbeat) or an Attempt when the shard cannot start;
    conclude(claim, attempt) records an attempt; attempt_of(flight or exception) builds it. Returns first's outcome.
    """
    flights: list[Flight] = []
    outcomes: dict[tuple[str, int], Outcome] = {}
    next_claim_at = [0.0]

    def live() -> list[Flight]:
        return [f for f in flights if not f.ended]

    def end(flight: Flight, attempt: Any) -> None:
        flight.ended = True
        flight.heartbeat.stop()
        outcomes[(flight.claim.run_id, flight.claim.shard_index)] = conclude(flight.claim, attempt)
        ctx.current = live()[0].claim if live() else None

    def finish(flight: Flight) -> None:
        flight.prepared.fill([flight.outputs[k] for k in range(len(flight.prepared.requests))])
        try:
            result = finish_shard(flight.prepared, flight.spec, ctx.loaded, ctx.generator, flight.location,
                                  attempt=flight.claim.attempt, worker=ctx.worker_id)
        except Exception as exc:  # noqa: BLE001 - recorded as this attempt's error, never raised into the engine
            end(flight, attempt_of(error=exc))
            return
        end(flight, attempt_of(result=result, stats_before=flight.stats_before))

    def start(claim: Claim) -> Flight | None:
        opened = open_shard(claim)
        if not isinstance(opened, tuple):
            outcomes[(claim.run_id, claim.shard_index)] = conclude(claim, opened)
            return None
        spec, location, shard, heartbeat = opened
        try:
            prepared = prepare_shard(shard, spec, ctx.loaded, heartbeat.row_done)
            check_adapters(prepared.requests, ctx.generator)
        except Exception as exc:  # noqa: BLE001
            heartbeat.stop()
            outcomes[(claim.run_id, claim.shard_index)] = conclude(claim, attempt_of(error=exc))
            return None
        flight = Flight(claim, spec, location, heartbeat, prepared, stats_before=_stats(ctx))
        flights.append(flight)
        if ctx.current is None:
            ctx.current = claim
        if flight.complete:  # every row failed before generation
            finish(flight)
        return flight

    def may_claim() -> bool:
        return (len(live()) < ctx.shards_in_flight and not ctx.shutdown.requested and not ctx.health.stopped
                and time.monotonic() >= next_claim_at[0])

    start(first)
    shared_call_failed = False
    while live() and not shared_call_failed:
        owners: list[tuple[Flight, int]] = [(f, k) for f in live() for k in f.unfinished()]
        requests: list[GenerationRequest] = [f.prepared.requests[k] for f, k in owners]

        def on_output(index: int, output: GenerationOutput) -> None:
            flight, k = owners[index]
            flight.outputs[k] = output
            flight.heartbeat.row_done(output)
            if flight.complete and not flight.ended:
                finish(flight)

        def refill(fits: Callable[[GenerationRequest], bool]) -> list[GenerationRequest]:
            if not may_claim():
                return []
            claim = ctx.store.claim_next(ctx.queue, ctx.worker_id, ctx.lease_ms)
            if claim is None:
                next_claim_at[0] = time.monotonic() + CLAIM_RETRY_S
                return []
            ctx.doorbell.ring(ctx.queue)
            if ctx.metrics is not None:
                ctx.metrics.shard_started(claim)
            log.info("shard %s of run %s joins the running batch", claim.shard_index, claim.run_id)
            flight = start(claim)
            if flight is None or flight.ended:
                return []
            joining = [k for k, request in enumerate(flight.prepared.requests) if fits(request)]
            owners.extend((flight, k) for k in joining)
            return [flight.prepared.requests[k] for k in joining]

        def should_stop() -> bool:
            return any(f.heartbeat.should_stop() for f in live())

        if not requests:
            break
        try:
            ctx.generator.generate(requests, owners[0][0].spec.params, on_output=on_output, should_stop=should_stop,
                                   refill=refill)
        except GenerationCancelled:
            for flight in live():
                if flight.heartbeat.stop_reason is not None:
                    end(flight, attempt_of(stopped=flight.heartbeat.stop_reason))
        except Exception as exc:  # noqa: BLE001 - each shard goes on alone, where faults are told apart
            log.warning("the shared batch of %d shard(s) failed (%s); each goes on alone", len(live()), describe(exc))
            shared_call_failed = True
    for flight in live():
        _finish_alone(flight, ctx, end, finish, attempt_of)
    return outcomes[(first.run_id, first.shard_index)]


def _finish_alone(flight: Flight, ctx: Any, end: Callable, finish: Callable, attempt_of: Callable) -> None:
    """The one-shard path for a shard's unfinished rows."""
    pending = flight.unfinished()

    def keep(k: int, output: GenerationOutput) -> None:
        flight.outputs[pending[k]] = output
        flight.heartbeat.row_done(output)

    try:
        requests = [flight.prepared.requests[k] for k in pending]
        outputs, _ = generate_halving_on_oom(ctx.generator, requests, flight.spec, None, flight.heartbeat.should_stop)
        for k, output in enumerate(outputs):
            keep(k, output)
    except GenerationCancelled:
        end(flight, attempt_of(stopped=flight.heartbeat.stop_reason or "cancelled"))
        return
    except Exception as exc:  # noqa: BLE001
        end(flight, attempt_of(error=exc))
        return
    finish(flight)


def _stats(ctx: Any) -> Any:
    stats = getattr(ctx.generator, "stats", None)
    return stats.copy() if stats is not None else None

