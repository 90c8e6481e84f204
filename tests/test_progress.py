"""Progress: a bar on a terminal; plain, periodic log lines anywhere else."""
from __future__ import annotations

import io
import logging

import pytest

from localization_heads.progress import Progress, track


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.INFO, logger="progress")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "progress"]


def test_log_lines_every_n_rows_with_rate_eta_and_failures(lines):
    clock, stream = Clock(), io.StringIO()
    with Progress("batch", 100, stream=stream, clock=clock) as p:     # default: a line per 5 % (5 rows)
        for i in range(100):
            clock.now += 1.0
            p.update(1, failed=i // 40)
    got = lines()
    assert len(got) == 20 and stream.getvalue() == ""                    # nothing drawn on the stream
    assert got[0] == "batch: 5/100 rows (5%), 1.00 rows/s, elapsed 0:05, ETA 1:35, 0 failed"
    assert got[-1] == "batch: 100/100 rows (100%), 1.00 rows/s, elapsed 1:40, ETA 0:00, 2 failed"


def test_fast_rows_do_not_flood_the_log(lines):
    """5 % of the rows in under five seconds: no line until five seconds have passed."""
    clock = Clock()
    with Progress("evaluate", 20000, stream=io.StringIO(), clock=clock) as p:
        for _ in range(20000):
            clock.now += 2 ** -11        # exact in binary: 5 s after 10,240 rows, 9.8 s in all
            p.update(1)
    assert [g.split(" (")[0] for g in lines()] == ["evaluate: 10240/20000 rows", "evaluate: 20000/20000 rows"]


def test_slow_rows_log_once_a_minute_and_the_end_is_always_logged(lines):
    clock = Clock()
    with Progress("batch", 1000, stream=io.StringIO(), clock=clock, initial=400) as p:   # 400 done before (resume)
        for _ in range(7):
            clock.now += 25.0
            p.update(1)
    got = lines()
    # a row every 25 s: lines at 75 s and 150 s (a minute passed), and the last at 175 s;
    # the rate counts this run's rows only (7 in 175 s), not the 400 done before
    assert [g.split(",")[0] for g in got] == ["batch: 403/1000 rows (40%)", "batch: 406/1000 rows (41%)",
                                              "batch: 407/1000 rows (41%)"]
    assert "0.04 rows/s" in got[-1] and "ETA 4:07:05" in got[-1]


def test_nothing_to_do_logs_nothing(lines):
    with Progress("batch", 10, initial=10, stream=io.StringIO()):
        pass
    assert lines() == []


def test_a_terminal_gets_a_tqdm_bar_with_the_failure_count(lines):
    stream = Terminal()
    with Progress("batch", 4, stream=stream) as p:
        for i in range(4):
            p.update(1, failed=i)
    drawn = stream.getvalue()
    assert "\r" in drawn and "4/4" in drawn and "3 failed" in drawn and "row/s" in drawn
    assert lines() == []


def test_track_counts_files_without_a_failure_column(lines):
    assert list(track(range(3), "select")) == [0, 1, 2]
    assert lines()[-1].startswith("select: 3/3 files (100%)") and "failed" not in lines()[-1]
