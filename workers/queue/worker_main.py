"""Start a Celery worker that serves one model on one device.

One process per device with Celery's solo pool: the model is loaded here, in the process that runs the
tasks, and nothing forks after that (CUDA does not survive a fork). `shardgen worker --devices` starts one such
process per device (supervisor.py), each from a WorkerConfig handed over in its environment.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from typing import Any

from ..generators import load_generator
from ..lifecycle import policy
from ..lifecycle.store import RunStore
from ..models.loader import check_device
from ..redis_conn import broker_url, redact
from . import tasks
from .celery_app import make_app, wake_queue
from .config import CONFIG_ENV, WorkerConfig
from .devices import claim_device
from .doorbell import Doorbell
from .handler import Shutdown, WorkerContext, watchdog_tick, worker_id
from .health import EXIT_STOPPED, Health
from .heartbeat import Watchdog
from .logs import configure_logging
from .metrics import WorkerMetrics

log = logging.getLogger("shardgen.worker")

def start_worker(config: WorkerConfig) -> None:
    configure_logging(config.loglevel, config.log_format)
    if config.storage_options:
        from ..storage import set_storage_options

        set_storage_options(config.storage_options)
    url = broker_url(config.broker)
    store = RunStore(url)  # fails with one clear line before the model is loaded if Redis is unreachable
    device = check_device(claim_device(config.runtime.device))
    started = time.perf_counter()
    spec = config.model
    loaded, generator = load_generator(spec, config.runtime, device=device)
    load_seconds = time.perf_counter() - started
    if loaded.info.get("note"):
        log.warning(loaded.info["note"])
    app = make_app(url)
    ctx = WorkerContext(
        loaded=loaded, generator=generator, store=store, doorbell=Doorbell.of(store, app), queue=spec.queue,
        device=device, worker_id=worker_id(device), shutdown=Shutdown(config.runtime.grace_seconds),
        metrics_port=config.metrics_port, serves=spec, shards_in_flight=config.runtime.shards_in_flight,
        # A worker that stops itself ends as SIGTERM ends it (Celery's warm shutdown), then exits EXIT_STOPPED.
        health=Health.for_worker(config.runtime.stall_seconds, lambda: os.kill(os.getpid(), signal.SIGTERM)),
    )
    if config.metrics_port is not None:
        ctx.metrics = WorkerMetrics(model=spec.model, device=device, queue=spec.queue, worker=ctx.worker_id)
        ctx.metrics.model_load_seconds.set(load_seconds)
        ctx.metrics.serve(config.metrics_port, config.metrics_host)
    log.warning("worker %s: %s (%s) on %s, %s, batch %s, queue %s, broker %s%s", ctx.worker_id, spec.model,
                spec.quantize, device, getattr(generator, "name", "generator"), config.runtime.batch_size, spec.queue,
                redact(url), f", metrics on :{config.metrics_port}" if config.metrics_port else "")
    name = config.name or f"shardgen-{spec.slug}-{device}@{socket.gethostname()}".replace(":", "-")
    serve(ctx, app, config.loglevel, name)


def serve(ctx: WorkerContext, app: Any, loglevel: str, name: str) -> None:
    """Take shards from ctx.queue until a shutdown signal; the watchdog runs beside it."""
    _load_what_shards_use()
    tasks.register(app, ctx)
    _on_shutdown_signal(ctx.shutdown)
    watchdog = Watchdog(lambda: watchdog_tick(ctx), policy.heartbeat_interval(ctx.lease_ms)).start()
    try:
        app.worker_main([
            "worker", "--pool=solo", f"--queues={wake_queue(ctx.queue)}", f"--hostname={name}", f"--loglevel={loglevel}",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ])
    finally:
        watchdog.stop()
        ctx.store.remove_worker(ctx.worker_id)
    if ctx.health.stopped:
        raise SystemExit(EXIT_STOPPED)


def _load_what_shards_use() -> None:
    """Import now, before taking shards, what the first shard would otherwise import on its own clock: building
    the first Arrow array loads pyarrow's pandas shim and compute functions (about 0.3 s)."""
    import pyarrow as pa
    import pyarrow.compute  # noqa: F401

    pa.array([""])


def _on_shutdown_signal(shutdown: Shutdown) -> None:
    """Celery's warm shutdown (SIGTERM, SIGINT) stops taking messages and waits for the running task; the
    shutdown deadline makes that task give its shard back once the grace period has passed."""
    from celery.signals import worker_shutting_down

    worker_shutting_down.connect(lambda **_: shutdown.request(), weak=False)


def main() -> None:
    """A supervised worker process: its WorkerConfig comes in the environment (supervisor.py)."""
    from shardgen.schemas.errors import ShardgenError

    try:
        start_worker(WorkerConfig.from_json(os.environ[CONFIG_ENV]))
    except ShardgenError as exc:
        log.error("error: %s", exc.line())
        raise SystemExit(exc.exit_code) from None


if __name__ == "__main__":
    main()
