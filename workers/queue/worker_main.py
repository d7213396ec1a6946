"""Start a Celery worker that serves one model on one device.

One process per device with Celery's solo pool: the model is loaded here, in the process that runs the
tasks, and nothing forks after that (CUDA does not survive a fork).
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from shardgen.schemas.model import ModelSpec

from ..generators import make_generator
from ..lifecycle import policy
from ..lifecycle.dispatch import CeleryWakeups
from ..lifecycle.store import LEASE_MS, RunStore
from ..models.loader import check_device, load_model
from ..redis_conn import broker_url, redact
from . import tasks
from .celery_app import configure, wake_queue
from .handler import Shutdown, WorkerContext, watchdog_tick, worker_id
from .heartbeat import Watchdog


def start_worker(
    spec: ModelSpec,
    *,
    device: str = "auto",
    batch_size: int = 16,
    broker: str | None = None,
    hf_token: str | None = None,
    compile: bool = False,
    loglevel: str = "INFO",
    node_name: str | None = None,
    grace_s: float = 30.0,
    console: Any = None,
) -> None:
    logging.getLogger("shardgen").setLevel(loglevel)
    url = broker_url(broker)
    device = check_device(device)
    store = RunStore(url)  # fails with one clear line before the model is loaded if Redis is unreachable
    loaded = load_model(spec, device, hf_token)
    if loaded.info.get("note") and console is not None:
        console.print(f"[yellow]{loaded.info['note']}")
    app = configure(url)
    queue = spec.queue
    ctx = WorkerContext(
        loaded=loaded, generator=make_generator(loaded, batch_size, compile=compile), store=store, wakeups=CeleryWakeups(app, store.redis),
        queue=queue, device=device, worker_id=worker_id(device), shutdown=Shutdown(grace_s),
    )
    tasks.CONTEXT = ctx
    _on_shutdown_signal(ctx.shutdown)
    if console is not None:
        console.print(f"worker {ctx.worker_id}: {spec.model} ({spec.quantize}) on {device}, queue {queue}, broker {redact(url)}")
    watchdog = Watchdog(lambda: watchdog_tick(ctx), policy.reap_interval(LEASE_MS)).start()
    name = node_name or f"shardgen-{spec.slug}-{device}@{socket.gethostname()}".replace(":", "-")
    try:
        app.worker_main([
            "worker", "--pool=solo", f"--queues={wake_queue(queue)}", f"--hostname={name}", f"--loglevel={loglevel}",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ])
    finally:
        watchdog.stop()
        store.remove_worker(ctx.worker_id)


def _on_shutdown_signal(shutdown: Shutdown) -> None:
    """Celery's warm shutdown (SIGTERM, SIGINT) stops taking messages and waits for the running task; the
    shutdown deadline makes that task give its shard back once the grace period has passed."""
    from celery.signals import worker_shutting_down

    worker_shutting_down.connect(lambda **_: shutdown.request(), weak=False)
