"""Errors a stage raises for problems the user can fix; shown as one line, no traceback."""


class StageError(Exception):
    """A stage cannot continue; the message names the file/key/source and what to do."""


def failure_line(task: str, reason) -> str:
    """The last line of a failed task's log: written by `python -m stages`, or by doit's reporter
    (stages.events) for a process that died before it could."""
    return f"[{task}] failed: {reason}"
