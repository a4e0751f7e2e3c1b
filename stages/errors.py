"""Errors a stage raises for problems the user can fix; shown as one line, no traceback."""


class ConfigError(Exception):
    """One or more configuration problems (sources.toml, adapter.toml), one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class StageError(Exception):
    """A stage cannot continue; the message names the file/key/source and what to do."""


class SourceError(StageError):
    """A source cannot do its job; the message names the source and what to do.

    Here at the bottom, not in stages.sources, so the HTTP client beneath the sources can raise it."""


def failure_line(task: str, reason) -> str:
    """The last line of a failed task's log: written by `python -m stages`, or by doit's reporter
    (stages.events) for a process that died before it could."""
    return f"[{task}] failed: {reason}"
