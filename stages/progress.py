"""How far a long part of a stage has got, for whoever watches it run: a line in the task's log now and then (a
headless `doit` run or CI reads those) and a small live file the dashboard shows, `data/progress/<task>.json`.
Nothing here changes a result.

`python -m stages` starts one tracker per stage process and stops it at the end (which removes the file); a stage
names each long part and how much work it holds (`part`), and the code doing the work says how much it did
(`advance`: nothing outside a part, so code shared with other stages, such as training's validation, may call it).
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

from stages import io, layout

LOG_EVERY = 30.0    # seconds between a part's log lines after its first
WRITE_EVERY = 1.0   # seconds between writes of the live file


def duration(seconds: float | None) -> str:
    """1h02m, 3m05s, 42s; "–" for unknown (also the dashboard's)."""
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Tracker:
    """One stage process's progress; `clock` is injectable for tests."""

    def __init__(self, task: str, clock=time.monotonic, log_every: float = LOG_EVERY,
                 write_every: float = WRITE_EVERY):
        self.task, self.clock, self.log_every, self.write_every = task, clock, log_every, write_every
        self.path = layout.progress_file(task)
        self.what, self.scope, self.unit, self.done, self.total = "", "", "", 0, 0
        self.began = self.logged = self.written = 0.0
        self.path.unlink(missing_ok=True)  # a killed run's file must not show as this run's progress

    def begin(self, what: str, total: int, unit: str, scope: str = "") -> None:
        self.what, self.scope, self.unit, self.done, self.total = what, scope, unit, 0, total
        self.began = self.logged = now = self.clock()
        print(self.line(now))
        self.write(now)

    def advance(self, n: int) -> None:
        if not self.what:
            return
        self.done += n
        now = self.clock()
        if now - self.logged >= self.log_every and self.done < self.total:
            self.logged = now
            print(self.line(now))
        if now - self.written >= self.write_every or self.done >= self.total:
            self.write(now)

    def end(self) -> None:
        self.what = ""

    def eta(self, now: float) -> float | None:
        """Seconds left in this part at its rate so far; None before anything is done."""
        return (now - self.began) / self.done * (self.total - self.done) if self.done else None

    def line(self, now: float) -> str:
        eta = self.eta(now)
        scope = f"{self.scope}, " if self.scope else ""
        return (f"{self.task}: {scope}{self.what}: {self.done}/{self.total} {self.unit}"
                + (f", {duration(now - self.began)}, about {duration(eta)} left" if eta is not None else ""))

    def write(self, now: float) -> None:
        self.written = now
        io.write_json(self.path, {"what": self.what, "scope": self.scope, "done": self.done, "total": self.total},
                      durable=False)  # what the dashboard's row shows; the log lines carry the rate and time left

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


_tracker: Tracker | None = None


def start(task: str) -> Tracker:
    global _tracker
    _tracker = Tracker(task)
    return _tracker


def stop() -> None:
    global _tracker
    if _tracker is not None:
        _tracker.close()
    _tracker = None


@contextlib.contextmanager
def part(what: str, total: int, unit: str, scope: str = "") -> Iterator[None]:
    """`what` names the part in a word or two (the dashboard's column is narrow: "perplexity"), `scope` what it is
    part of ("clinical_decision split"); `total` counts `unit`s of work, as `advance` will."""
    tracker = _tracker
    if tracker is None or total <= 0:
        yield
        return
    tracker.begin(what, total, unit, scope)
    try:
        yield
    finally:
        tracker.end()


def advance(n: int = 1) -> None:
    if _tracker is not None:
        _tracker.advance(n)
