"""Which shards of a run still need work, for both drivers: the run store's records (distributed) or the
results present in the work directory (embedded), checked against storage with one listing, not a probe per
shard."""

from __future__ import annotations

from shardgen.schemas.layout import RunLayout, part_name
from shardgen.schemas.states import ShardState

from .store import RunStore


def present_results(layout: RunLayout) -> set[str]:
    """Names of the published results and of attempt objects in a run's directory."""
    from ..storage import files  # pyarrow and fsspec: only for commands that look at files

    return set(files.list_names(layout.run_dir)) | set(files.list_names(layout.attempts_dir))


def unfinished_shards(layout: RunLayout, shards_total: int) -> list[int]:
    """Shards without a published result (the embedded run, which records nothing anywhere else)."""
    present = present_results(layout)
    return [index for index in range(shards_total) if part_name(index) not in present]


def missing_results(store: RunStore, layout: RunLayout) -> list[int]:
    """Shards the store records as done whose result is nowhere in the work directory (deleted, lost)."""
    present = present_results(layout)
    return [
        shard.index
        for shard in store.shards(layout.run_id)
        if shard.state == ShardState.DONE.value
        and part_name(shard.index) not in present
        and (not shard.result or shard.result.rstrip("/").rsplit("/", 1)[-1] not in present)
    ]


def redo_run(store: RunStore, layout: RunLayout, *, failed_rows: bool = False) -> int:
    """Queue again every shard of the run without a result (failed, cancelled, lost), and with `failed_rows`
    (retry) every shard with failed rows; the caller rings the doorbell of its queue."""
    return store.redo(layout.run_id, missing_results(store, layout), failed_rows=failed_rows)
