"""A task's log: its last lines, wrapped at the widget's width, following the tail as lines arrive.

The log is plain text (a line with `[bold]` or `[/]` shows as it is written, never as markup), and long lines
wrap instead of scrolling sideways. Built on the chat's Transcript, which re-wraps only what an append changes.
"""
from __future__ import annotations

from tui.widgets.transcript import Transcript


class TaskLog(Transcript):
    def __init__(self, *, max_lines: int, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.max_lines = max_lines
        self._written = False

    @property
    def log_lines(self) -> list[str]:
        """The lines as the task wrote them (before wrapping); empty before any."""
        return list(self._paragraphs) if self._written else []

    def write_lines(self, lines: list[str]) -> None:
        if not lines:
            return
        self.append(("\n" if self._written else "") + "\n".join(lines))
        self._written = True
        excess = len(self._paragraphs) - self.max_lines
        if excess > self.max_lines // 4:  # drop the oldest in batches: each drop re-wraps what is kept
            at_end = self.is_vertical_scroll_end
            del self._paragraphs[:excess]
            self._rewrap_from(0)
            if at_end:
                self.scroll_end(animate=False, immediate=True, x_axis=False, force=True)

    def clear(self) -> "TaskLog":
        self._written = False
        return super().clear()
