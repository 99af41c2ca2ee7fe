"""Progress on stderr (stdout stays machine-readable) and short summary tables."""
from __future__ import annotations

import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)
written: list[str] = []  # outputs this process has completed (an interrupted stage names them)


def wrote(path) -> None:
    written.append(str(path))


PLAIN_EVERY_S = 10.0  # a plain progress line this often when stderr is not a terminal (CI logs, cluster jobs)


def _fields(fields: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


@contextmanager
def _plain_progress(description: str, total: int | None, completed: int, every: float):
    """What a log file can hold: one line every `every` seconds and one at the end, never a redrawn bar."""
    start = last = time.monotonic()
    state = {"done": completed, "info": ""}

    def line() -> None:
        elapsed = time.monotonic() - start
        done = state["done"]
        rate = (done - completed) / elapsed if elapsed > 0 else 0.0
        eta = f", {(total - done) / rate:.0f} s left" if total and rate > 0 else ""
        of = f"/{total}" if total else ""
        console.print(f"{description}: {done}{of} {state['info']} ({elapsed:.0f} s{eta})".replace("  ", " "),
                      markup=False, highlight=False, soft_wrap=True)

    def advance(n: int = 1, **fields):
        nonlocal last
        state["done"] += n
        if fields:
            state["info"] = _fields(fields)
        if time.monotonic() - last >= every:
            last = time.monotonic()
            line()
    yield advance
    line()


@contextmanager
def progress_bar(description: str, total: int, completed: int = 0, show: bool = True):
    """Yields `advance(n=1, **fields)`; fields (e.g. loss) are shown beside the bar (`show=False`: nothing
    is drawn, e.g. on the other ranks of a distributed run)."""
    if not show:
        yield lambda n=1, **fields: None
        return
    if not console.is_terminal:
        with _plain_progress(description, total, completed, PLAIN_EVERY_S) as advance:
            yield advance
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False, refresh_per_second=2) as progress:
        task = progress.add_task(description, total=total, completed=completed, info="")

        def advance(n: int = 1, **fields):
            progress.update(task, advance=n, info=_fields(fields))
        yield advance


def summary(title: str, rows: dict[str, object]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in rows.items():
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)
