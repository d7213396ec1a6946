"""The Parquet metadata every result shard carries, under keys prefixed `shardgen.`."""

from __future__ import annotations

META_PREFIX = "shardgen."


def meta_key(name: str) -> bytes:
    return (META_PREFIX + name).encode()


def decode_metadata(raw: dict[bytes, bytes] | None) -> dict[str, str]:
    """The shardgen entries of a Parquet file's key-value metadata, prefix removed."""
    out: dict[str, str] = {}
    for key, value in (raw or {}).items():
        name = key.decode(errors="replace")
        if name.startswith(META_PREFIX):
            out[name[len(META_PREFIX) :]] = value.decode(errors="replace")
    return out
