"""A doit reporter that also writes every task event as a JSON line to data/events.jsonl.

doit writes its dep DB only at the end of a run, so live state (running, done,
failed, up to date) comes from this stream; the dashboard follows it. Only `doit run`
makes a reporter, so it is also where a run takes the project's run lock (stages/lock.py).
"""
from __future__ import annotations

import os
import time

from doit.reporter import ConsoleReporter

from stages import io, layout, lock
from stages.errors import failure_line


def emit(event: str, **fields) -> None:
    """One event; `pid` (doit's, the run lock's holder) tells one run's events from another's."""
    io.append_jsonl(layout.events_file(), {"t": round(time.time(), 3), "pid": os.getpid(), "event": event, **fields})


def end_log(task: str, reason: str) -> str:
    """Make a failed task's log end with its outcome, and return that outcome. `python -m stages` writes
    that line itself (the reason a user can act on), unless its process died first (a signal, an OOM kill,
    a native crash): then doit's reason goes there, e.g. "Command failed: ... returned -11" (-11 = SIGSEGV)."""
    path = layout.log_file(task)
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            raw = fh.read()
    except OSError:
        raw = b""
    tail = raw.decode("utf-8", "replace").rstrip().splitlines()
    said = failure_line(task, "")
    if tail and tail[-1].startswith(said):
        return tail[-1][len(said):].strip() or reason
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as log:
        log.write(("\n" if raw and not raw.endswith(b"\n") else "") + failure_line(task, reason) + "\n")
    return reason


class EventReporter(ConsoleReporter):
    desc = "console output plus JSON-lines task events in data/events.jsonl"

    def __init__(self, outstream, options):
        self.lock = lock.hold()  # one run at a time: a second one exits here, with one line, before any task
        super().__init__(outstream, options)

    def initialize(self, tasks, selected_tasks):
        emit("run_start", selected=list(selected_tasks or []))
        super().initialize(tasks, selected_tasks)

    def execute_task(self, task):
        if task.actions:  # group tasks (`train` = every train:<x>) do nothing themselves
            emit("task_start", task=task.name, log=str(layout.log_file(task.name)))
        super().execute_task(task)

    def add_success(self, task):
        if task.actions:
            emit("task_done", task=task.name)
        super().add_success(task)

    def add_failure(self, task, fail_info):
        error = str(fail_info.get_msg()).strip().splitlines()[-1:]
        if task.actions:  # the log's own last line says why better than doit's "Command failed: ... returned 1"
            error = [end_log(task.name, error[0] if error else "failed")]
        emit("task_failed", task=task.name, error=error)
        super().add_failure(task, fail_info)

    def skip_uptodate(self, task):
        if task.actions:
            emit("task_uptodate", task=task.name)
        super().skip_uptodate(task)

    def skip_ignore(self, task):
        emit("task_ignored", task=task.name)
        super().skip_ignore(task)

    def complete_run(self):
        emit("run_end", failures=[f["task"].name for f in self.failures])
        super().complete_run()
