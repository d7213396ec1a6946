"""Config files written for the tools shardgen replaces, read as shardgen's own options.

`shardgen run --config config.toml` and `ConfigManager` take a fine-tuning suite's file as it is: its
`[inferencer]` table becomes run options here, so producer/config.py only ever sees shardgen's names.
"""

from __future__ import annotations

from typing import Any, Mapping


def translate(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """`raw` with a suite's [inferencer] table replaced by the shardgen options it means."""
    section = raw.get("inferencer")
    if not isinstance(section, Mapping):
        return dict(raw)
    from .inferencer import run_options

    return {**{key: value for key, value in raw.items() if key != "inferencer"}, **run_options(section, source)}
