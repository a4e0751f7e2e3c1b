"""One run at a time, wherever it starts: the project's run lock, data/run.lock.

Every `doit run` of the project (from a shell, CI or the dashboard) takes it before its first
task and holds it until its process exits; a second run refuses with one line naming the holder.
It is an flock, which the kernel drops with the process that held it: a run killed hard (kill -9,
OOM, a lost machine) leaves no stale lock, and the next run takes it over. The file also says who
holds it (pid, how it was started, since when, the command, where its events begin in
data/events.jsonl), so the dashboard can follow any run. Only `run` takes it: `doit list`,
`doit info` and the dashboard's status read never wait for it; `forget`, `ignore`, `clean` and
`reset-dep` are refused while a run holds it.
"""
from __future__ import annotations

import fcntl
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from stages import layout

STARTED_BY_ENV = "MEDFORGE_RUN_BY"  # the dashboard sets it to "dashboard"; otherwise CI=true says "ci"

_held: int | None = None  # this process's lock fd: kept open (and locked) until the process exits


@dataclass(frozen=True)
class Holder:
    pid: int
    started_by: str         # shell, ci or dashboard
    started: float          # time.time() when it took the lock
    command: str            # e.g. "doit run train:clinical_coding"
    events_offset: int = 0  # where its events begin in data/events.jsonl

    def describe(self) -> str:
        since = time.strftime("%H:%M:%S", time.localtime(self.started))
        return f"{self.command} (pid {self.pid}, started from {self.started_by} at {since})"


class Busy(Exception):
    def __init__(self, holder: Holder):
        super().__init__(f"another run is going: {holder.describe()}; wait for it, or stop it "
                         f"(kill -INT {holder.pid}, or x in the dashboard)")
        self.holder = holder


def _path(root: Path) -> Path:
    return Path(root) / layout.run_lock()


def _started_by() -> str:
    by = os.environ.get(STARTED_BY_ENV)
    if by:
        return by
    return "ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "shell"


def _read(fd: int) -> Holder | None:
    try:
        return Holder(**orjson.loads(os.pread(fd, 4096, 0)))
    except (orjson.JSONDecodeError, TypeError, OSError):
        return None


def _held_by_other(fd: int, root: Path) -> Holder | None:
    """The holder if another open of the file holds the lock; None when it is free."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        for _ in range(20):  # taken a moment ago: its holder is writing who it is
            holder = _read(fd)
            if holder is not None:
                return holder
            time.sleep(0.05)
        return Holder(pid=0, started_by="unknown", started=time.time(), command=f"a run holding {_path(root)}")
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None


def acquire(root: Path | str = ".") -> Holder:
    """Take the lock for this process (until it exits), or raise Busy naming who has it."""
    global _held
    path = _path(Path(root))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by the tasks' processes (PEP 446)
    for _ in range(100):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _held_by_other(fd, Path(root))
            if holder is not None:
                os.close(fd)
                raise Busy(holder) from None
            time.sleep(0.02)  # only a reader's brief probe (a dashboard's poll): try again
    else:  # readers for 2 s on end: cannot happen with polls of a few ms, but never wait forever
        holder = _read(fd)
        os.close(fd)
        raise Busy(holder or Holder(0, "unknown", time.time(), "another run"))
    events = Path(root) / layout.events_file()
    holder = Holder(pid=os.getpid(), started_by=_started_by(), started=round(time.time(), 3),
                    command=" ".join(["doit", *sys.argv[1:]]),
                    events_offset=events.stat().st_size if events.exists() else 0)
    os.ftruncate(fd, 0)
    os.pwrite(fd, orjson.dumps(asdict(holder)), 0)
    _held = fd
    return holder


def hold() -> Holder:
    """`doit run`'s entry (the reporter calls it): the lock, or exit with one line saying who has it."""
    try:
        return acquire()
    except Busy as busy:
        raise SystemExit(f"medforge: {busy}") from None


DB_WRITERS = ("forget", "ignore", "clean", "reset-dep")  # doit commands that change its DB (clean: targets too)


def refuse_db_writes(argv: list[str]) -> None:
    """dodo.py's guard: `doit forget|ignore|clean|reset-dep` beside a run would be undone by it (doit writes
    its DB when a run ends) or pull its files away: refuse them, one line, while a run holds the lock."""
    if len(argv) > 1 and argv[1] in DB_WRITERS and (holder := current()) is not None:
        raise SystemExit(f"medforge: not now: {holder.describe()} is going; doit {argv[1]} once it has "
                         f"finished (or stop it: kill -INT {holder.pid}, or x in the dashboard)")


def current(root: Path | str = ".") -> Holder | None:
    """The run going now (any process's, this one's included), or None."""
    path = _path(Path(root))
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return _held_by_other(fd, Path(root))
    finally:
        os.close(fd)


def last(root: Path | str = ".") -> Holder | None:
    """Who took the lock last (running or not): where the last run's events begin."""
    try:
        fd = os.open(_path(Path(root)), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return _read(fd)
    finally:
        os.close(fd)
