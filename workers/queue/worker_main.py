"""Start a Celery worker that serves one model on one device.

One process per device with Celery's solo pool: the model is loaded here, in the process that runs the
tasks, and nothing forks after that (CUDA does not survive a fork).
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from shardgen.schemas.model import ModelSpec

from . import tasks
from .celery_app import configure
from ..generators import make_generator
from ..models.loader import check_device, load_model
from ..redis_conn import broker_url, redact
from ..lifecycle.store import RunStore


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
    console: Any = None,
) -> None:
    logging.getLogger("shardgen").setLevel(loglevel)
    url = broker_url(broker)
    device = check_device(device)
    store = RunStore(url)  # fails with one clear line before the model is loaded if Redis is unreachable
    loaded = load_model(spec, device, hf_token)
    if loaded.info.get("note") and console is not None:
        console.print(f"[yellow]{loaded.info['note']}")
    generator = make_generator(loaded, batch_size, compile=compile)
    tasks.CONTEXT = tasks.WorkerContext(
        loaded=loaded, generator=generator, store=store, worker_id=tasks.worker_id(device), batch_size=batch_size
    )
    if console is not None:
        console.print(
            f"worker {tasks.CONTEXT.worker_id}: {spec.model} ({spec.quantize}) on {device}, "
            f"queue {spec.queue}, broker {redact(url)}"
        )
    app = configure(url)
    tasks.Watchdog(store).start()
    name = node_name or f"shardgen-{spec.slug}-{device}@{socket.gethostname()}".replace(":", "-")
    app.worker_main(
        [
            "worker",
            "--pool=solo",
            f"--queues={spec.queue}",
            f"--hostname={name}",
            f"--loglevel={loglevel}",
            "--without-gossip",
            "--without-mingle",
        ]
    )
