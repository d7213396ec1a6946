"""Open a dataset source (a file or URL, a save_to_disk directory, a hub name) as a `datasets.Dataset`."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from shardgen.schemas.errors import InputError, StorageError
from shardgen.schemas.layout import is_url

from . import files

FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def load_dataset_table(source: str, split: str | None = None, limit: int | None = None, *,
                       subset: str | None = None, revision: str | None = None) -> Any:
    """A `datasets.Dataset` for a file or fsspec URL (.jsonl, .json, .csv, .parquet), a save_to_disk directory,
    or a hub dataset name (with its subset, also called config, and revision); errors are one line."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    files.check_location(source, "input")
    url = is_url(source)
    path = Path(source).expanduser()
    try:
        if not url and path.is_dir():
            if not any((path / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
                raise InputError(f"{path} is a directory but not a saved dataset", "pass a file, or a directory written by save_to_disk")
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                loaded = _pick_split(loaded, split, source)
        elif url or path.exists():
            loaded = _load_file(source, path)
        elif _looks_like_path(source):
            raise InputError(f"input file {source} does not exist", "check the path")
        else:
            loaded = datasets.load_dataset(source, subset, split=split or "train", revision=revision)
    except (InputError, StorageError):
        raise
    except FileNotFoundError as exc:
        raise InputError(f"cannot find dataset {source}: {_first_line(exc)}", "check the path or the hub name") from None
    except Exception as exc:  # datasets wraps parser errors in many types; the user needs one line
        if "corresponds to no data" in str(exc):
            raise InputError(f"dataset {source} has no rows", "pass a file with at least one row") from None
        if url or path.exists():
            raise InputError(f"cannot read dataset {source}: {_first_line(exc)}", "check that the file is valid and complete") from None
        raise InputError(
            f"cannot load dataset {source} from the hub: {_first_line(exc)}",
            "check the name, --subset and --revision, and the network, or pass a local file",
        ) from None
    if limit is not None:
        loaded = loaded.select(range(min(limit, len(loaded))))
    if len(loaded) == 0:
        raise InputError(f"dataset {source} has no rows", "pass a file with at least one row")
    return loaded


def _load_file(source: str, path: Path) -> Any:
    import datasets

    suffix = Path(source.split("?", 1)[0]).suffix.lower()
    fmt = FORMATS.get(suffix)
    if fmt is None:
        raise InputError(
            f"unsupported input format {suffix or '(no extension)'} for {source}",
            "use .jsonl, .json, .csv or .parquet, or a save_to_disk directory",
        )
    if is_url(source):
        if not files.exists(source):
            raise InputError(f"input file {source} does not exist", "check the URL")
        return datasets.load_dataset(fmt, data_files=source, split="train", storage_options=files.storage_options(),
                                     cache_dir=_scratch_cache())
    if not os.access(path, os.R_OK):
        raise InputError(f"cannot read {path}: permission denied", "check the file's permissions")
    if path.stat().st_size == 0:
        raise InputError(f"dataset {source} has no rows", "pass a file with at least one row")
    return datasets.load_dataset(fmt, data_files=str(path), split="train", cache_dir=_scratch_cache())


def _scratch_cache() -> str:
    """Where `datasets` writes its Arrow copy of a data file: gone when this process ends. In its default cache
    every run of a new file would leave a full copy behind (submit stages its own; run reads the file once)."""
    directory = tempfile.mkdtemp(prefix="shardgen-datasets-")
    atexit.register(shutil.rmtree, directory, True)
    return directory


def _pick_split(dataset_dict: Any, split: str | None, source: str) -> Any:
    names = list(dataset_dict.keys())
    chosen = split or ("train" if "train" in names else names[0])
    if chosen not in dataset_dict:
        raise InputError(f"dataset {source} has no split {chosen!r}", f"use --split with one of {', '.join(names)}")
    return dataset_dict[chosen]


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix.lower() in FORMATS or source.count("/") > 1 or bool(
        re.search(r"\s", source)
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
