"""A worker's logs: text for people, or one JSON object per line (`--log-format json`) for log pipelines.

Every record logged while a shard runs carries that shard's run id and index, in both formats.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

current_shard: tuple[str, int] | None = None
"""(run id, shard index) of the shard this process is running, set by the message handler."""


class ShardContext(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.run_id, record.shard = current_shard if current_shard else (None, None)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "run_id": getattr(record, "run_id", None),
            "shard": getattr(record, "shard", None),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, log_format: str) -> None:
    """One handler on the root logger, for shardgen's and Celery's records alike; Celery is told not to set up
    its own."""
    from celery.signals import setup_logging

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ShardContext())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    setup_logging.connect(lambda **_: None, weak=False)
