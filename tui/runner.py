"""Detached doit runs: start, find again, stop, forget, and doit's static view of the task graph.

A run is `python -m doit run ...` in its own session (start_new_session): closing the
dashboard or losing the SSH connection (SIGHUP to the terminal's session) never reaches
it. data/run.json records it, so a reopened dashboard reattaches to its events and logs.
One run at a time: a lock file makes check-then-start atomic across dashboards.
No Textual here; the app calls these from worker threads.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

from stages import io, layout
from stages.errors import StageError

# Popen handles of runs this process started: polled so finished ones are reaped, not zombies.
_CHILDREN: dict[int, subprocess.Popen] = {}


class RunBusy(StageError):
    """A second start while a run is going; the message says what is running."""


@dataclass
class RunRecord:
    pid: int
    run_id: str
    tasks: list[str]
    started: float
    create_time: float          # the process's start time: a reused pid is not our run
    events_offset: int          # where this run's events begin in data/events.jsonl
    argv: list[str] = field(default_factory=list)

    def describe(self) -> str:
        what = " ".join(self.tasks) or "everything"
        return f"doit run {what} (pid {self.pid}, started {time.strftime('%H:%M:%S', time.localtime(self.started))})"


def read_record(root: Path) -> RunRecord | None:
    try:
        data = io.read_json(root / layout.run_record())
        return RunRecord(**data)
    except (FileNotFoundError, orjson.JSONDecodeError, TypeError):
        return None


def _process_start(pid: int) -> float | None:
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_alive(record: RunRecord) -> bool:
    child = _CHILDREN.get(record.pid)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(record.pid, None)
        return False
    started = _process_start(record.pid)
    return started is not None and abs(started - record.create_time) < 1.0


def current_run(root: Path) -> RunRecord | None:
    """The run that is going now, if any."""
    record = read_record(root)
    return record if record is not None and is_alive(record) else None


@contextlib.contextmanager
def _start_lock(root: Path):
    path = root / layout.DATA / ".run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def start(root: Path, tasks: list[str] | tuple[str, ...] = (), python: str = sys.executable) -> RunRecord:
    """Start `doit run <tasks>` (all default tasks when empty), detached; raise RunBusy if one is going."""
    root = Path(root)
    with _start_lock(root):
        running = current_run(root)
        if running is not None:
            raise RunBusy(f"a run is already going: {running.describe()}; stop it (x) or wait for it to finish")
        events = root / layout.events_file()
        events_offset = events.stat().st_size if events.exists() else 0
        log_path = root / layout.run_log()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        run_id = uuid.uuid4().hex[:12]
        argv = [python, "-m", "tui.doit_run", "run", *tasks]  # doit, with SIGINT handled even if inherited ignored
        env = {**os.environ, "MEDFORGE_RUN_ID": run_id, "PYTHONUNBUFFERED": "1", "PYTHONPATH": _pythonpath()}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, cwd=root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=env, close_fds=True)
        _CHILDREN[proc.pid] = proc
        import psutil

        try:
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.NoSuchProcess:  # finished already; the record still tells what ran
            create_time = time.time()
        record = RunRecord(pid=proc.pid, run_id=run_id, tasks=list(tasks), started=time.time(),
                           create_time=create_time, events_offset=events_offset, argv=argv)
        io.write_json(root / layout.run_record(), asdict(record))
        return record


def _wait_gone(record: RunRecord, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not is_alive(record):
            return True
        time.sleep(0.1)
    return not is_alive(record)


def stop(root: Path, grace_s: float = 15.0) -> str:
    """Stop the running job: SIGINT to its whole process group first, so doit saves the state of
    tasks that finished; SIGTERM, then SIGKILL, if it does not end in time."""
    record = current_run(Path(root))
    if record is None:
        return "nothing is running"
    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(record.pid, sig)  # the run leads its own session, so its pgid is its pid
        except ProcessLookupError:
            return f"stopped {record.describe()}"
        if _wait_gone(record, wait):
            return f"stopped {record.describe()} ({signal.Signals(sig).name})"
    return f"could not stop {record.describe()}; kill process group {record.pid} by hand"


def _doit(root: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "doit", *args], cwd=root, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": _pythonpath()})


def forget(root: Path, tasks: list[str]) -> str:
    """`doit forget <tasks>`: they will run next time. Refused during a run (doit rewrites its DB when it ends)."""
    running = current_run(Path(root))
    if running is not None:
        raise RunBusy(f"cannot forget while {running.describe()} is going; stop it (x) first")
    done = _doit(Path(root), "forget", *tasks)
    if done.returncode != 0:
        raise StageError(f"doit forget {' '.join(tasks)} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return f"forgot {' '.join(tasks)}: will run next time"


def static_status(root: Path, timeout: float = 120.0) -> dict:
    """doit's view of every task (will run and why, or up to date) from its dep DB, as JSON.

    Runs in a subprocess: importing dodo.py (and doit's loader) stays out of the app's process.
    """
    done = subprocess.run([sys.executable, "-m", "tui.doit_status"], cwd=root, capture_output=True,
                          timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, "PYTHONPATH": _pythonpath()})
    if done.returncode != 0:
        lines = (done.stderr or done.stdout or b"").decode("utf-8", "replace").strip().splitlines()
        raise StageError("; ".join(lines[-3:]) or f"doit status failed (exit {done.returncode})")
    return orjson.loads(done.stdout)


def _pythonpath() -> str:
    """Make `tui` and `stages` importable from the project folder even when not pip-installed."""
    here = str(Path(__file__).resolve().parents[1])
    rest = os.environ.get("PYTHONPATH")
    return here + (os.pathsep + rest if rest else "")
