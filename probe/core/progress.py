"""One progress-bar style for all long work (rich), silenced in tests and when not asked for."""

from __future__ import annotations

from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextmanager
def progress_bar(total: int, description: str, enabled: bool = True, completed: int = 0):
    """Yield ``advance(n=1, **fields)``; a no-op when ``enabled`` is False."""
    if not enabled:
        yield lambda n=1, **kw: None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total, completed=completed, info="")

        def advance(n: int = 1, info: str | None = None):
            if info is None:
                bar.update(task, advance=n)
            else:
                bar.update(task, advance=n, info=info)

        yield advance
