"""Start a Celery worker that serves one model on one device.

One process per device with Celery's solo pool: the model is loaded here, in the process that runs the
tasks, and nothing forks after that (CUDA does not survive a fork). `shardgen worker --devices` starts one such
process per device (supervisor.py).
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from shardgen.schemas.model import ModelSpec

from ..generators import make_generator
from ..lifecycle import policy
from ..lifecycle.dispatch import CeleryWakeups
from ..lifecycle.store import RunStore
from ..models.loader import check_device, load_model
from ..redis_conn import broker_url, redact
from . import tasks
from .celery_app import configure, wake_queue
from .devices import claim_device
from .handler import Shutdown, WorkerContext, watchdog_tick, worker_id
from .heartbeat import Watchdog
from .logs import configure_logging
from .metrics import WorkerMetrics

log = logging.getLogger("shardgen.worker")


def start_worker(
    spec: ModelSpec,
    *,
    device: str = "auto",
    batch_size: int | str = 16,
    max_memory: str | None = None,
    broker: str | None = None,
    hf_token: str | None = None,
    compile: bool = False,
    loglevel: str = "INFO",
    log_format: str = "text",
    node_name: str | None = None,
    grace_s: float = 30.0,
    metrics_port: int | None = None,
    console: Any = None,
) -> None:
    configure_logging(loglevel, log_format)
    url = broker_url(broker)
    store = RunStore(url)  # fails with one clear line before the model is loaded if Redis is unreachable
    device = check_device(claim_device(device))
    started = time.perf_counter()
    loaded = load_model(spec, device, hf_token)
    load_seconds = time.perf_counter() - started
    if loaded.info.get("note"):
        log.warning(loaded.info["note"])
    generator = make_generator(loaded, batch_size, compile=compile, max_memory=max_memory)
    ctx = WorkerContext(
        loaded=loaded, generator=generator, store=store, wakeups=CeleryWakeups(configure(url), store.redis),
        queue=spec.queue, device=device, worker_id=worker_id(device), shutdown=Shutdown(grace_s), metrics_port=metrics_port,
    )
    if metrics_port is not None:
        ctx.metrics = WorkerMetrics(model=spec.model, device=device, queue=spec.queue, worker=ctx.worker_id)
        ctx.metrics.model_load_seconds.set(load_seconds)
        ctx.metrics.serve(metrics_port)
    log.warning("worker %s: %s (%s) on %s, batch %s, queue %s, broker %s%s", ctx.worker_id, spec.model, spec.quantize,
                device, batch_size, spec.queue, redact(url), f", metrics on :{metrics_port}" if metrics_port else "")
    serve(ctx, url, loglevel, node_name or f"shardgen-{spec.slug}-{device}@{socket.gethostname()}".replace(":", "-"))


def serve(ctx: WorkerContext, url: str, loglevel: str, name: str) -> None:
    """Take shards from ctx.queue until a shutdown signal; the watchdog runs beside it."""
    _load_what_shards_use()
    app = configure(url)
    tasks.CONTEXT = ctx
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
