"""Detached doit runs: start, find again, stop, forget, and doit's static view of the task graph.

A run is `python -m doit run ...` in its own session (start_new_session): closing the
dashboard or losing the SSH connection (SIGHUP to the terminal's session) never reaches
it. One run at a time is the project's run lock (stages/lock.py), which every `doit run`
takes, whoever starts it: the dashboard finds, follows and stops a run started from a shell
or CI just as its own.
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
from pathlib import Path

import orjson

from stages import layout, lock
from stages.errors import StageError
from stages.lock import Holder

# Popen handles of runs this process started: polled so finished ones are reaped, not zombies.
_CHILDREN: dict[int, subprocess.Popen] = {}


class RunBusy(StageError):
    """A second start while a run is going; the message says what is running."""


def current_run(root: Path) -> Holder | None:
    """The run going now, whoever started it: the run lock's holder."""
    for pid, child in list(_CHILDREN.items()):
        if child.poll() is not None:
            _CHILDREN.pop(pid, None)
    return lock.current(root)


@contextlib.contextmanager
def _one_start(root: Path):
    """Two dashboards pressing `a` at once: one starts, the other then sees its run (not a refused doit)."""
    path = root / layout.DATA / ".start.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def start(root: Path, tasks: list[str] | tuple[str, ...] = (), python: str = sys.executable,
          wait_s: float = 120.0) -> Holder:
    """Start `doit run <tasks>` (all default tasks when empty), detached; raise RunBusy if one is going.

    Returns once the run holds the lock (doit takes it after loading dodo.py), so what the caller
    shows is the lock's own record; a run that exits first (refused, or a broken dodo.py) says why."""
    root = Path(root)
    with _one_start(root):
        running = current_run(root)
        if running is not None:
            raise RunBusy(f"a run is already going: {running.describe()}; stop it (x) or wait for it to finish")
        log_path = root / layout.run_log()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [python, "-m", "tui.doit_run", "run", *tasks]  # doit, with SIGINT handled even if inherited ignored
        env = {**os.environ, lock.STARTED_BY_ENV: "dashboard", "PYTHONUNBUFFERED": "1", "PYTHONPATH": _pythonpath()}
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, cwd=root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=env, close_fds=True)
        _CHILDREN[proc.pid] = proc
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            holder = lock.current(root)
            if holder is not None and holder.pid == proc.pid:
                return holder
            if proc.poll() is not None:
                _CHILDREN.pop(proc.pid, None)
                last = lock.last(root)
                if last is not None and last.pid == proc.pid:
                    return last  # it ran, and ended before we looked (nothing to do, or a quick failure)
                said = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
                raise RunBusy(said[0].removeprefix("medforge: "))
            time.sleep(0.05)
        raise StageError(f"doit (pid {proc.pid}) did not start its run within {wait_s:.0f} s; see {log_path}")


def stop(root: Path, grace_s: float = 15.0) -> str:
    """Stop the running job, whoever started it: SIGINT first, so doit saves the state of tasks that
    finished; SIGTERM, then SIGKILL, if it does not end in time. A run that leads its own process group
    (the dashboard's; a shell's job) gets the signal in the whole group, its tasks' processes too."""
    root = Path(root)
    holder = current_run(root)
    if holder is None:
        return "nothing is running"

    def gone() -> bool:
        now = current_run(root)
        return now is None or (now.pid, now.started) != (holder.pid, holder.started)

    for sig, wait in ((signal.SIGINT, grace_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            if os.getpgid(holder.pid) == holder.pid:
                os.killpg(holder.pid, sig)
            else:  # e.g. doit in a CI script's process group: doit and the task processes it started
                _signal_tree(holder.pid, sig)
        except ProcessLookupError:
            return f"stopped {holder.describe()}"
        except PermissionError:
            return f"cannot stop {holder.describe()}: not this user's process"
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and not gone():
            time.sleep(0.1)
        if gone():
            return f"stopped {holder.describe()} ({signal.Signals(sig).name})"
    return f"could not stop {holder.describe()}; kill process group {holder.pid} by hand"


def _signal_tree(pid: int, sig: int) -> None:
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        raise ProcessLookupError(pid) from None
    os.kill(pid, sig)
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, sig)


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


CONFIG_FILES = ("dodo.py", "sources.toml", "adapters/*/adapter.toml")  # what the task graph itself is made from


def input_stamps(root: Path, inputs: list[str]) -> dict[str, tuple[int, int] | None]:
    """(mtime, size) of every file doit's static view read (`inputs`: its tasks' file deps) and of the configuration,
    a new or removed adapter.toml included; None for a missing file. When they change, that view is out of date."""
    paths = set(inputs)
    for pattern in CONFIG_FILES:
        paths.update(str(p.relative_to(root)) for p in root.glob(pattern))
    stamps: dict[str, tuple[int, int] | None] = {}
    for rel in paths:
        try:
            st = (root / rel).stat()
            stamps[rel] = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamps[rel] = None
    return stamps


def _pythonpath() -> str:
    """Make `tui` and `stages` importable from the project folder even when not pip-installed."""
    here = str(Path(__file__).resolve().parents[1])
    rest = os.environ.get("PYTHONPATH")
    return here + (os.pathsep + rest if rest else "")
