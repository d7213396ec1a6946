"""The Celery glue: the app, the thin task, the message handler, the heartbeat and the watchdog."""
