"""A generator for tests that must see a shard running: shardgen's engine over the test's model, held at the start of
every call while a hold file exists, so the test decides when shards may finish instead of hoping to catch one.

Started as a real worker's engine: `shardgen worker --engine tests.held_generator:held`, with the hold file named
in SHARDGEN_TEST_HOLD_FILE. While held it still honours should_stop, so cancel and SIGTERM's grace work as usual.

`tests.held_generator:held_vllm` is vLLM's generator held mid-shard instead: its first row finishes (and is
reported to the heartbeat), then it waits, with the shard's other requests still inside vLLM.
"""

from __future__ import annotations

import os
import time

from shardgen.workers.generation import GenerationCancelled
from shardgen.workers.generators import load_generator

HOLD_FILE_ENV = "SHARDGEN_TEST_HOLD_FILE"


class Held:
    def __init__(self, generator, hold_file: str, after_rows: int = 0):
        self.generator, self.hold_file, self.after_rows = generator, hold_file, after_rows
        self.name = generator.name

    @property
    def last_path(self):
        return getattr(self.generator, "last_path", self.generator.name)

    @property
    def batch_size(self):
        return self.generator.batch_size

    @batch_size.setter
    def batch_size(self, value):
        self.generator.batch_size = value

    @property
    def auto_batch(self):
        return getattr(self.generator, "auto_batch", False)

    @property
    def stats(self):
        return self.generator.stats

    def generate(self, requests, params, *, on_output=None, should_stop=None):
        if self.after_rows == 0:
            self._wait(should_stop)
            return self.generator.generate(requests, params, on_output=on_output, should_stop=should_stop)
        finished = []

        def reported(index, output):
            if on_output:
                on_output(index, output)
            finished.append(index)
            if len(finished) == self.after_rows:
                self._wait(should_stop)

        return self.generator.generate(requests, params, on_output=reported, should_stop=should_stop)

    def _wait(self, should_stop):
        while os.path.exists(self.hold_file):
            if should_stop is not None and should_stop():
                raise GenerationCancelled("stopped while held")
            time.sleep(0.05)


def held(spec, runtime):
    loaded, generator = load_generator(spec, runtime.replace(engine="shardgen"))
    return loaded, Held(generator, os.environ[HOLD_FILE_ENV])


def held_vllm(spec, runtime):
    loaded, generator = load_generator(spec, runtime.replace(engine="vllm"))
    return loaded, Held(generator, os.environ[HOLD_FILE_ENV], after_rows=1)
