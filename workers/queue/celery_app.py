"""The Celery app: JSON only, late acks, one task at a time per worker process."""

from __future__ import annotations

from celery import Celery

TASK_NAME = "shardgen.process_shard"

app = Celery("shardgen")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    event_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # shardgen's leases bring a running shard of a dead worker back in seconds. Redelivery after the visibility
    # timeout covers the one message a worker had fetched but not yet claimed; a redelivered copy of a shard that
    # is still running finds its lease held and is dropped, so the timeout can be short.
    # kombu's Redis transport waits polling_interval (1 s by default) before fetching the next message after an
    # ack; with prefetch 1 every shard paid it (bench-queue: 0.79x embedded at 16-row shards, 1.11x at 0.05 s).
    broker_transport_options={"visibility_timeout": 120, "polling_interval": 0.05},
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    task_default_queue="sg.q.default",
)


def configure(broker: str) -> Celery:
    from urllib.parse import urlsplit, urlunsplit

    from ..redis_conn import tls_options

    tls = tls_options(broker)
    if tls is not None:
        app.conf.broker_use_ssl = tls
        broker = urlunsplit(urlsplit(broker)._replace(query=""))
    app.conf.broker_url = broker
    return app


def enqueue(broker_app: Celery, message: dict, queue: str, countdown: float | None = None) -> None:
    broker_app.send_task(TASK_NAME, args=[message], queue=queue, countdown=countdown, serializer="json")
