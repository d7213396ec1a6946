"""What people look at: progress bars (rows, tokens/s, ETA) and tables."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text


class TokensPerSecondColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        tokens = task.fields.get("tokens", 0)
        rate = tokens / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.1f} tok/s", style="cyan")


class RowProgress:
    """A progress bar over rows that also shows generated tokens/s and the ETA."""

    def __init__(self, console: Console, total: int, description: str = "generating"):
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rows"),
            TokensPerSecondColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task(description, total=total, tokens=0)
        self.tokens = 0

    def __enter__(self) -> "RowProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def advance(self, rows: int = 1, tokens: int = 0) -> None:
        self.tokens += tokens
        self.progress.update(self.task, advance=rows, tokens=self.tokens)


def key_value_table(title: str, items: Iterable[tuple[str, Any]]) -> Table:
    """Names on the left, never wrapped; long values fold, but ids (a run id) fit any terminal of 80 columns."""
    items = [(key, str(value)) for key, value in items]
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True, min_width=max((len(key) for key, _ in items), default=0))
    table.add_column(justify="right", overflow="fold")
    for key, value in items:
        table.add_row(key, value)
    return table


def rows_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], *, max_width: int = 60,
               no_wrap: Sequence[str] = ()) -> Table:
    """A table of rows; columns named in `no_wrap` (ids people copy) are never split over lines."""
    table = Table(title=title, title_justify="left", show_lines=False)
    for name in columns:
        if name in no_wrap:
            table.add_column(name, no_wrap=True, min_width=len(name))
        else:
            table.add_column(name, overflow="fold", max_width=max_width)
    for row in rows:
        table.add_row(*[_cell(v, max_width) for v in row])
    return table


def _cell(value: Any, width: int) -> str:
    text = "" if value is None else str(value)
    text = " ".join(text.split())
    return text if len(text) <= width * 2 else text[: width * 2 - 1] + "…"


def human_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:,.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count} B"

