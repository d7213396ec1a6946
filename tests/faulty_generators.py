"""Worker engines with a fault, for tests that start real workers with `--engine tests.faulty_generators:NAME`:

    sick      the model loads, then every call raises the error a GPU with a sticky fault raises ("an illegal
              memory access was encountered"), in milliseconds, on every row
    blocking  every call blocks and never asks should_stop, as a hung kernel or a hung storage call does
"""

from __future__ import annotations

import threading

from shardgen.workers.generators import load_generator

CUDA_FAULT = "CUDA error: an illegal memory access was encountered"


class Wrapped:
    def __init__(self, generator):
        self.generator, self.name = generator, generator.name

    @property
    def batch_size(self):
        return self.generator.batch_size

    @batch_size.setter
    def batch_size(self, value):
        self.generator.batch_size = value


class Sick(Wrapped):
    def generate(self, requests, params, *, on_output=None, should_stop=None):
        raise RuntimeError(CUDA_FAULT)


class Blocking(Wrapped):
    def generate(self, requests, params, *, on_output=None, should_stop=None):
        threading.Event().wait()  # forever: only the process's end stops it


def _engine(spec, runtime):
    return load_generator(spec, runtime.replace(engine="shardgen"))


def sick(spec, runtime):
    loaded, generator = _engine(spec, runtime)
    return loaded, Sick(generator)


def blocking(spec, runtime):
    loaded, generator = _engine(spec, runtime)
    return loaded, Blocking(generator)

