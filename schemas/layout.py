"""Where a run's files live under its work directory, on a local disk or behind an fsspec URL.

    WORK_DIR/RUN_ID/run.json                              the run's spec and size, written at submit
    WORK_DIR/RUN_ID/input/block-00000.parquet             the input, staged once: one row group per shard
    WORK_DIR/RUN_ID/attempts/part-00042.<token>.parquet   what one attempt at shard 42 wrote
    WORK_DIR/RUN_ID/part-00042.parquet                    shard 42's result: the attempt the run store chose

Every attempt writes its own object, so two attempts never write one name; the run store's atomic completion
decides which attempt is the result, and only that one is published under the part name. This holds on any
store, with or without hard links or conditional writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

RUN_FILE = "run.json"
SHARDS_PER_BLOCK = 64
"""Shards staged per input file: few objects to write at submit, small footers for a worker to read."""
ROWS_PER_BLOCK = 16_384


def is_url(location: str) -> bool:
    return "://" in location


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a local path or a URL (URLs always use /)."""
    if is_url(base):
        return "/".join([base.rstrip("/"), *parts])
    return os.path.join(base, *parts)


def shards_per_block(shard_size: int) -> int:
    return max(1, min(SHARDS_PER_BLOCK, ROWS_PER_BLOCK // shard_size))


@dataclass(frozen=True)
class RunLayout:
    work_dir: str
    run_id: str
    shard_size: int

    @property
    def run_dir(self) -> str:
        return join(self.work_dir, self.run_id)

    @property
    def run_file(self) -> str:
        return join(self.run_dir, RUN_FILE)

    @property
    def input_dir(self) -> str:
        return join(self.run_dir, "input")

    @property
    def attempts_dir(self) -> str:
        return join(self.run_dir, "attempts")

    @property
    def shards_per_block(self) -> int:
        return shards_per_block(self.shard_size)

    def input_block(self, block: int) -> str:
        return join(self.input_dir, f"block-{block:05d}.parquet")

    def input_location(self, shard_index: int) -> tuple[str, int]:
        """The staged input file holding this shard, and the shard's row group in it."""
        block, group = divmod(shard_index, self.shards_per_block)
        return self.input_block(block), group

    def part(self, shard_index: int) -> str:
        return join(self.run_dir, part_name(shard_index))

    def attempt_part(self, shard_index: int, token: str) -> str:
        return join(self.attempts_dir, f"part-{shard_index:05d}.{token}.parquet")

    def shard_rows(self, shard_index: int, rows_total: int) -> range:
        """The input row indices of a shard: shards are consecutive slices of shard_size rows."""
        start = shard_index * self.shard_size
        return range(start, min(start + self.shard_size, rows_total))


def part_name(shard_index: int) -> str:
    return f"part-{shard_index:05d}.parquet"


def shard_count(rows_total: int, shard_size: int) -> int:
    return -(-rows_total // shard_size)
