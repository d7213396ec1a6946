"""The Celery app: JSON only, one task at a time per worker process, and what its messages mean.

A shard's place in line is kept by the run store (workers/lifecycle): each model has a Redis list of the shards
waiting for it (`sg.q.<model>`). Celery carries only wake-ups: a `shardgen.take_shard` message on the model's
Celery queue (`sg.take.<model>`) asks one worker to take the next waiting shard. Wake-ups are fungible, so they
are acknowledged on receipt: one lost with a dying worker costs nothing (another is sent), and one delivered
twice finds nothing to take. Only a window of them is kept in flight, so Redis holds a few hundred bytes per
shard however large the run.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from celery import Celery

from shardgen.schemas.shard import TakeShard

TASK_NAME = "shardgen.take_shard"

app = Celery("shardgen")
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    event_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=False,
    worker_prefetch_multiplier=1,
    # kombu's Redis transport waits polling_interval (1 s by default) after an ack before fetching the next
    # message; a worker would idle that long between shards.
    broker_transport_options={"polling_interval": 0.05},
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    task_default_queue="sg.take.default",
)


def wake_queue(queue: str) -> str:
    """The Celery queue whose messages wake workers for the shards waiting in `queue` (sg.q.X -> sg.take.X)."""
    return queue.replace(".q.", ".take.", 1)


def configure(broker: str) -> Celery:
    from ..redis_conn import tls_options

    tls = tls_options(broker)
    if tls is not None:
        app.conf.broker_use_ssl = tls
        broker = urlunsplit(urlsplit(broker)._replace(query=""))
    if app.conf.broker_url not in (None, broker):
        app.close()  # connections pooled for the previous broker must not be reused for this one
        app.amqp._producer_pool = None
    app.conf.broker_url = broker
    return app


def send_wakeups(broker_app: Celery, queue: str, count: int) -> None:
    message = TakeShard(queue).to_dict()
    with broker_app.producer_or_acquire() as producer:
        for _ in range(count):
            broker_app.send_task(TASK_NAME, args=[message], queue=wake_queue(queue), serializer="json",
                                 producer=producer)
