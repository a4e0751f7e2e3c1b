"""What the Data and Eval views share: a report read from stage outputs in a worker, reloaded on demand,
whenever the pipeline changes and whenever the view is shown again."""
from __future__ import annotations

from textual import on
from textual.binding import Binding
from textual.screen import Screen

from tui.messages import PipelineChanged, RunStateChanged
from tui.widgets.topbar import TopBar


class ReportScreen(Screen):
    BINDINGS = [Binding("ctrl+r", "reload_now", "Reload")]

    def load(self) -> None:  # a thread worker in each view: reads files, posts ReportLoaded
        raise NotImplementedError

    def on_screen_resume(self) -> None:
        self.query_one(TopBar).show_run(self.app.running, self.app.run_summary())
        self.action_reload()

    @on(PipelineChanged)
    def _pipeline_changed(self) -> None:
        self.action_reload()

    @on(RunStateChanged)
    def _run_state(self, msg: RunStateChanged) -> None:
        self.query_one(TopBar).show_run(msg.running, msg.summary)

    def action_reload(self) -> None:
        self.load()

    def action_reload_now(self) -> None:
        """ctrl+r: read the reports again, and say so (they change only when a stage writes them)."""
        self.load()
        self.app.notify("reloaded from the stages' reports", timeout=2, markup=False)
