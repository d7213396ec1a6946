"""Where data lives: dataset sources, a run's staged input, its results; local paths or fsspec URLs."""

from .datasets import load_dataset_table
from .files import (
    check_location,
    check_writable,
    describe,
    exists,
    list_names,
    open_input,
    open_output,
    parse_storage_options,
    remove_tree,
    set_storage_options,
    storage_errors,
)
from .run_files import (
    new_attempt_token,
    publish_result,
    read_run_file,
    read_schema,
    read_table,
    result_location,
    stage_input,
    write_run_file,
)

__all__ = [
    "check_location",
    "check_writable",
    "describe",
    "exists",
    "list_names",
    "load_dataset_table",
    "new_attempt_token",
    "open_input",
    "open_output",
    "parse_storage_options",
    "publish_result",
    "read_run_file",
    "read_schema",
    "read_table",
    "remove_tree",
    "result_location",
    "set_storage_options",
    "stage_input",
    "storage_errors",
    "write_run_file",
]
