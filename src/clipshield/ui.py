"""Progress on stderr (stdout stays machine-readable) and short summary tables."""
from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)
written: list[str] = []  # outputs this process has completed (an interrupted stage names them)


def wrote(path) -> None:
    written.append(str(path))


@contextmanager
def progress_bar(description: str, total: int, completed: int = 0, show: bool = True):
    """Yields `advance(n=1, **fields)`; fields (e.g. loss) are shown beside the bar (`show=False`: nothing
    is drawn, e.g. on the other ranks of a distributed run)."""
    if not show:
        yield lambda n=1, **fields: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False, refresh_per_second=2) as progress:
        task = progress.add_task(description, total=total, completed=completed, info="")

        def advance(n: int = 1, **fields):
            info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            progress.update(task, advance=n, info=info)
        yield advance


def summary(title: str, rows: dict[str, object]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in rows.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
