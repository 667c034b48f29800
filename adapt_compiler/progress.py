"""Progress display for long steps: a bar or spinner on a terminal, silent otherwise.

    progress(iterable, desc="train")      # a tqdm bar over a loop
    with status("capturing the graph"):   # a rich spinner for one long step, then "✓ ... 1.2 s"
        ...

Both stay silent when stderr is not a terminal (CI, pipes, pytest), when `quiet=True`, inside
`with quiet():` (the CLI's `--quiet`), or with ADAPT_COMPILER_QUIET=1. Nothing here changes what
the wrapped code computes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

_QUIET_DEPTH = 0  # > 0 inside `with quiet():`


def _interactive() -> bool:
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None)) and stream.isatty()


def is_quiet(quiet: bool = False) -> bool:
    """Whether progress output is suppressed (explicitly, globally, or because stderr is no TTY)."""
    return bool(quiet or _QUIET_DEPTH or os.environ.get("ADAPT_COMPILER_QUIET") or not _interactive())


@contextlib.contextmanager
def quiet(enabled: bool = True):
    """Silence every progress display inside the block (the CLI's `--quiet`)."""
    global _QUIET_DEPTH
    _QUIET_DEPTH += int(bool(enabled))
    try:
        yield
    finally:
        _QUIET_DEPTH -= int(bool(enabled))


def progress(iterable, desc: str = "", quiet: bool = False, **kwargs):
    """Wrap `iterable` in a tqdm bar unless quiet or stderr is not a terminal (then return it as is)."""
    if is_quiet(quiet):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, **kwargs)


@contextlib.contextmanager
def status(desc: str, quiet: bool = False):
    """A spinner while the block runs, then one line with its duration; nothing when quiet."""
    if is_quiet(quiet):
        yield
        return
    from rich.console import Console

    console = Console(stderr=True)
    start = time.perf_counter()
    with console.status(f"{desc} …"):
        yield
    console.print(f"[green]✓[/green] {desc} [dim]({time.perf_counter() - start:.1f} s)[/dim]")
