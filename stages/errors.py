"""Errors a stage raises for problems the user can fix; shown as one line, no traceback."""


class StageError(Exception):
    """A stage cannot continue; the message names the file/key/source and what to do."""
