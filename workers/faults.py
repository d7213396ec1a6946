"""Whose fault a failure is: a row's own problem stays that row's error; a worker's fault fails the attempt.

A row fails alone for its own reasons (too long for the context, a template that refuses it, no room under
max_length): those are found before generation and recorded on the row. An exception that hits every row of a
shard, or any CUDA error, is the worker's: the attempt fails and the shard goes to another worker
(schemas/states.py Fault says which budget each failure spends).
"""

from __future__ import annotations

from shardgen.schemas.errors import ShardgenError, TransientStorageError
from shardgen.schemas.states import Fault

DEVICE_ERROR_MARKERS = (
    "cuda error", "illegal memory access", "device-side assert", "cublas_status", "cudnn_status", "cudnn error",
    "nccl error", "ecc error", "unspecified launch failure", "hip error",
)
"""Words in the message of an error the device raised: after one of these, the process's device is not to be trusted
(a sticky CUDA error fails every later call in the same context)."""
DEVICE_ERROR_TYPES = ("AcceleratorError", "CudaError", "OutOfResources")

ROW_RAISED = "generation failed: "
"""The start of the error of a row whose generation raised (workers/shard_processing.py)."""


class WorkerFault(RuntimeError):
    """This worker cannot generate the shard (its device failed, or every row raised): retry it elsewhere."""


def is_device_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return type(exc).__name__ in DEVICE_ERROR_TYPES or any(marker in text for marker in DEVICE_ERROR_MARKERS)


def describe(exc: BaseException) -> str:
    """One line for the run store and the logs."""
    if isinstance(exc, ShardgenError):
        return exc.line()
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:500] if lines else ''}".rstrip(": ")


def fault_of(exc: BaseException) -> Fault:
    """Which budget a failed attempt spends: the worker's faults, the store's patience, or the shard's retries."""
    if isinstance(exc, WorkerFault) or is_device_error(exc):
        return Fault.WORKER
    if isinstance(exc, TransientStorageError):
        return Fault.STORAGE
    return Fault.SHARD
