"""The progress bars every long CLI job draws (compile, eval, index build): one look for all."""

from __future__ import annotations

from typing import Any


def progress_bars(console: Any, label_width: int, extra_field: str, **options: Any) -> Any:
    """A rich `Progress` on `console`: spinner, a label `label_width` wide, a bar, done/total,
    the task's `extra_field` text and the elapsed time. `options` go to `Progress`."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    return Progress(
        SpinnerColumn(),
        TextColumn(f"{{task.description:<{label_width}}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(f"{{task.fields[{extra_field}]}}"),
        TimeElapsedColumn(),
        console=console,
        **options,
    )
