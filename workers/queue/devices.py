"""Which accelerator a worker process takes: `--devices` for a whole node, `--device auto` for one process.

A node's GPUs are found without initialising CUDA (from CUDA_VISIBLE_DEVICES or `nvidia-smi`), because the
supervising process must never touch CUDA: its children are pinned to one GPU each before torch starts.
`--device auto` takes a GPU that no other shardgen worker on this host holds (a lock file per GPU), so two
default workers never share one GPU without being told to.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile

from shardgen.schemas.errors import InvalidParameter, ModelError

_held_locks: list[int] = []
"""File descriptors of the GPU locks this process holds until it exits."""


def visible_gpus() -> list[str]:
    """IDs of this host's GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else nvidia-smi's list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listed = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in listed.stdout.splitlines() if line.strip()] if listed.returncode == 0 else []


def parse_devices(value: str) -> list[str]:
    """`all` (every GPU), `0,1,3` (GPU ids) or `cpu,cpu` (CPU workers): one entry per worker process."""
    items = [item.strip().lower() for item in value.split(",") if item.strip()]
    if items == ["all"]:
        gpus = visible_gpus()
        if not gpus:
            raise ModelError("--devices all found no GPU on this host", "use --devices cpu (or cpu,cpu for two CPU workers)")
        return gpus
    for item in items:
        if item != "cpu" and not item.isdigit() and not item.startswith("gpu-") and not item.startswith("mig-"):
            raise InvalidParameter(f"--devices entry {item!r} is not a GPU id or cpu", "use all, GPU ids such as 0,1,3, or cpu,cpu")
    if not items:
        raise InvalidParameter("--devices is empty", "use all, GPU ids such as 0,1,3, or cpu,cpu")
    return items


def claim_device(device: str) -> str:
    """The device to load on: `auto` becomes the first GPU of this host that no other worker holds (or cpu when
    there is none); an explicit cuda:N is locked too, so a later `auto` worker leaves it alone."""
    gpus = visible_gpus()
    if device == "auto":
        if not gpus:
            return "cpu"
        for position, gpu in enumerate(gpus):
            if _lock(gpu):
                return f"cuda:{position}"
        raise ModelError(
            f"every GPU of this host ({', '.join(gpus)}) already has a shardgen worker",
            "run `shardgen worker --devices all` once per node, or name a device with --device cuda:N",
        )
    if device.startswith("cuda"):
        position = int(device.partition(":")[2] or 0)
        if position < len(gpus):
            _lock(gpus[position])
    return device


def _lock(gpu: str) -> bool:
    path = os.path.join(tempfile.gettempdir(), f"shardgen-gpu-{gpu}.lock")
    descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        return False
    _held_locks.append(descriptor)
    return True
