"""Progress of a long stage (batch, select, evaluate): rows done / total, rows/s, ETA and the
running failure count.

On a terminal (stderr is a TTY) a tqdm bar, with log records routed through tqdm so they print
above the bar instead of breaking it. Anywhere else — a SLURM log, a pipe, CI — a redrawn bar
would fill the file with carriage returns, so it writes one plain log line every `every_rows`
rows (default 5 % of the total; but not more often than every `min_seconds`, so a fast stage
does not flood its log) or every `every_seconds` (default a minute), whichever comes first, and
a last line when the stage ends.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

T = TypeVar("T")
log = logging.getLogger("progress")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """`with Progress("batch", total) as p: ... p.update(1, failed=k)` — k is the running count."""

    def __init__(self, what: str, total: int, *, unit: str = "rows", initial: int = 0,
                 stream: TextIO | None = None, every_rows: int | None = None, every_seconds: float = 60.0,
                 min_seconds: float = 5.0,
                 count_failures: bool = True, clock: Callable[[], float] = time.monotonic):
        self.count_failures = count_failures
        self.what, self.total, self.unit = what, int(total), unit
        self.done, self.failed, self.initial = int(initial), 0, int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_rows = every_rows or max(1, math.ceil(self.total / 20))
        self.every_seconds, self.min_seconds, self.clock = every_seconds, min_seconds, clock
        self._bar: tqdm | None = None
        self._redirect: contextlib.ExitStack | None = None
        self._start = self._last_time = clock()
        self._last_done = self.done

    def __enter__(self) -> "Progress":
        if self.interactive:
            self._redirect = contextlib.ExitStack()
            self._redirect.enter_context(logging_redirect_tqdm())
            self._bar = tqdm(total=self.total, initial=self.done, desc=self.what, unit=self.unit.rstrip("s") or "it",
                             file=self.stream, dynamic_ncols=True)
            if self.count_failures:
                self._bar.set_postfix_str(self._failed_text(), refresh=False)
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
            self._redirect.close()
        elif self.done != self._last_done:
            self._log_line()

    def update(self, n: int = 1, *, failed: int | None = None) -> None:
        """`n` more rows finished (failed ones included); `failed`: the failure count so far."""
        self.done += n
        if failed is not None:
            self.failed = int(failed)
        if self._bar is not None:
            if self.count_failures:
                self._bar.set_postfix_str(self._failed_text(), refresh=False)
            self._bar.update(n)
            return
        now = self.clock()
        since = now - self._last_time
        if (self.done - self._last_done >= self.every_rows and since >= self.min_seconds) or since >= self.every_seconds:
            self._log_line(now)

    def _failed_text(self) -> str:
        return f"{self.failed} failed" if self.count_failures else ""

    def _log_line(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        rate = (self.done - self.initial) / elapsed
        left = self.total - self.done
        eta = _duration(left / rate) if rate > 0 else "?"
        percent = 100.0 * self.done / self.total if self.total else 100.0
        line = (f"{self.what}: {self.done}/{self.total} {self.unit} ({percent:.0f}%), {rate:.2f} {self.unit}/s, "
                f"elapsed {_duration(elapsed)}, ETA {eta}")
        log.info("%s", f"{line}, {self._failed_text()}" if self.count_failures else line)
        self._last_time, self._last_done = now, self.done


def track(items: Iterable[T], what: str, *, total: int | None = None, unit: str = "files") -> Iterator[T]:
    """Iterate `items`, showing progress (no failure count: the caller's loop has none)."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    with Progress(what, len(items) if total is None else total, unit=unit, count_failures=False) as progress:
        for item in items:
            yield item
            progress.update(1)


def quiet_library_bars(stream: TextIO | None = None) -> None:
    """Turn off transformers' / huggingface_hub's own bars ("Loading weights", downloads) when
    `stream` (stderr) is not a terminal: they redraw with carriage returns into log files. Their
    switch is process-wide by design; on a terminal they are left as they are."""
    stream = stream if stream is not None else sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
