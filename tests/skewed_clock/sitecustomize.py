"""Put this directory first on PYTHONPATH, with SHARDGEN_TEST_CLOCK_SKEW=SECONDS, and every Python process started so
runs with a wall clock that many seconds off (time.time and time.time_ns), from before any module is imported: a
node whose clock is wrong, without libfaketime."""

import os
import time

_skew = float(os.environ.get("SHARDGEN_TEST_CLOCK_SKEW") or 0)
if _skew:
    _time, _time_ns = time.time, time.time_ns
    time.time = lambda: _time() + _skew
    time.time_ns = lambda: _time_ns() + int(_skew * 1e9)
