"""The Celery app: JSON only, one task at a time per worker process, and what its messages mean.

Celery is shardgen's doorbell, and only that. A shard's place in line is kept by the run store
(workers/lifecycle): each model has a Redis list of the shards waiting for it (`sg.q.<model>`), and a claim pops
and leases one in one atomic script. A `shardgen.take_shard` message on the model's Celery queue
(`sg.take.<model>`) asks one worker to make that claim. Messages are fungible, so they are acknowledged on
receipt: one lost with a dying worker costs nothing (the doorbell rings again), one delivered twice finds
nothing to take. Celery gives the workers what it is good at: a supervised consumer loop, warm shutdown on
SIGTERM, JSON-only message handling, and one queue per model that any number of hosts consume.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from celery import Celery

TASK_NAME = "shardgen.take_shard"

SETTINGS = dict(
    task_serializer="json",
    result_serializer="json",
    event_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_ignore_result=True,
    task_acks_late=False,
    worker_prefetch_multiplier=1,
    # kombu's Redis transport sleeps polling_interval (1 s by default) after a task before it asks for the next
    # message: a worker would idle that long between shards. A poll costs one Redis call.
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


def make_app(broker: str) -> Celery:
    """A Celery app for one broker URL (TLS settings taken from a rediss:// URL's query); one per process."""
    from ..redis_conn import tls_options

    from ..redis_conn import is_sentinel, sentinel_master

    app = Celery("shardgen", set_as_current=False)
    app.conf.update(SETTINGS)
    if is_sentinel(broker):  # kombu reads the same sentinel://...;sentinel://... URL, and the master's name here
        app.conf.broker_transport_options = {**SETTINGS["broker_transport_options"], "master_name": sentinel_master()}
    tls = tls_options(broker)
    if tls is not None:
        app.conf.broker_use_ssl = tls
        broker = urlunsplit(urlsplit(broker)._replace(query=""))
    app.conf.broker_url = broker
    return app
