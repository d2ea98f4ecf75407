"""The terminal: one console for results (stdout), one for messages and progress bars (stderr).

Commands and the modules they call print through these, so piped output stays parseable and every
progress bar looks the same. Text a user or a manifest supplied goes through `escape` (rich would
read `[batch, 3, 64, 64]` as markup and drop it).
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape

# Piped or captured output gets wide tables rather than names wrapped at 80 columns.
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


def progress():
    """A rich progress bar on stderr: description, bar, done/total, elapsed and remaining time."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=err_console)


def warn(msg: str) -> None:
    """A one-line warning on stderr (the message is printed as text, not markup)."""
    err_console.print(f"[yellow]warning:[/yellow] {escape(msg)}", highlight=False, soft_wrap=True)


def note(msg: str) -> None:
    """A one-line note on stderr, printed as text."""
    err_console.print(msg, highlight=False, markup=False, soft_wrap=True)
