"""The one-line bar on every view: which view, the other views' keys, and the run's state."""
from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

TABS = (("1", "Pipeline", "pipeline"), ("2", "Training", "training"), ("3", "Data", "data"),
        ("4", "Eval", "eval"), ("5", "Chat", "chat"))


class TopBar(Static):
    def __init__(self, view: str):
        super().__init__(id="topbar")
        self.view = view
        self.run_text = ""
        self.running = False

    def on_mount(self) -> None:
        self.show_run(getattr(self.app, "running", False), self.app.run_summary() if hasattr(self.app, "run_summary") else "")

    def show_run(self, running: bool, summary: str) -> None:
        self.running, self.run_text = running, summary
        self.update(self._render_bar())

    def on_resize(self) -> None:
        self.update(self._render_bar())

    def _render_bar(self) -> Text:
        # below 100 columns the other views show their key only, so the run's state keeps the room it needs
        compact = 0 < self.size.width < 100
        bar = Text("medforge ", style="bold")
        for key, label, view in TABS:
            if view == self.view:
                bar.append(f" {key} {label} ", style="reverse bold")
            else:
                bar.append(f" {key} " if compact else f" {key} {label} ", style="dim")
        bar.append("  ")
        bar.append("● " if self.running else "○ ", style="bold cyan" if self.running else "dim")
        run_text = self.run_text
        # too long for the line: drop its last details (" · doit (pid …, started from …)") before cutting the rest
        while 0 < self.size.width < bar.cell_len + len(run_text) and " · " in run_text:
            run_text = run_text.rsplit(" · ", 1)[0]
        bar.append(run_text, style="cyan" if self.running else "")
        return bar  # what still does not fit is cut with an ellipsis (app.tcss)
