"""A worker engine on a sick device, for tests: the model loads, then every generate call raises the error a GPU with
a sticky fault raises ("an illegal memory access was encountered"), in milliseconds, on every row.

Started as a real worker's engine: `shardgen worker --engine tests.sick_generator:sick`.
"""

from __future__ import annotations

from shardgen.workers.generators import load_generator

CUDA_FAULT = "CUDA error: an illegal memory access was encountered"


class Sick:
    def __init__(self, generator):
        self.generator, self.name = generator, generator.name

    @property
    def batch_size(self):
        return self.generator.batch_size

    @batch_size.setter
    def batch_size(self, value):
        self.generator.batch_size = value

    def generate(self, requests, params, *, on_output=None, should_stop=None):
        raise RuntimeError(CUDA_FAULT)


def sick(spec, runtime):
    loaded, generator = load_generator(spec, runtime.replace(engine="shardgen"))
    return loaded, Sick(generator)
