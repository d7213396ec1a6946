"""What every shardgen command shares: one-line errors and quiet libraries."""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any, Callable

import click
from shardgen.schemas.errors import InvalidParameter, ShardgenError


PIPED_WIDTH = 160
"""Columns of tables written to a file or a pipe, where rich would otherwise assume 80."""


class LazyConsole:
    """A rich Console made on first use: commands that print only JSON (`status --json`) never import rich."""

    def __init__(self, **options: Any):
        self._options, self._console = options, None

    def get(self) -> Any:
        """The rich Console itself."""
        if self._console is None:
            from rich.console import Console

            options = dict(self._options)
            stream = sys.stderr if options.get("stderr") else sys.stdout
            if not stream.isatty() and "COLUMNS" not in os.environ:
                options.setdefault("width", PIPED_WIDTH)  # a table saved to a file is read whole, not wrapped at 80
            self._console = Console(**options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


console = LazyConsole(stderr=True)
"""Messages, progress and errors (stderr)."""
out = LazyConsole()
"""Results: tables and JSON (stdout)."""


def print_json(data: Any) -> None:
    """JSON on stdout for scripts: plain, without importing rich."""
    import json

    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def one_line_errors(func: Callable) -> Callable:
    """Print a ShardgenError as `error: <what is wrong>: <what to do>` and exit with its code; no traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ShardgenError as exc:
            line = exc.line()
            if exc.hint is None and isinstance(exc, InvalidParameter):
                line += f": fix the value (see `shardgen {click.get_current_context().info_name} --help`)"
            console.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted")
            sys.exit(130)

    return wrapper


def quiet_libraries() -> None:
    """Warnings only, and no per-file progress bars from transformers: shardgen shows its own progress."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def check_output_target(output: str, *, overwrite: bool, inputs: tuple[str | None, ...] = ()) -> None:
    """Refuse an output that is one of the command's inputs (whatever --overwrite says), or a file that exists
    already unless --overwrite. A store that cannot say whether the output exists is left to the write to report."""
    from shardgen.schemas.errors import StorageError
    from shardgen.workers.storage import files

    target = files.describe(output)
    if any(source and files.describe(str(source)) == target for source in inputs):
        raise InvalidParameter(f"the output {output} is also the input", "write the results to another file")
    if overwrite:
        return
    try:
        present = files.exists(output)
    except StorageError:
        return
    if present:
        raise ShardgenError(f"the output {output} exists already", "pass --overwrite to replace it, or choose another name")
