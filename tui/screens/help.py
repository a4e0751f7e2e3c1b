"""Every key, gathered from the bindings themselves so the list cannot drift from what the keys do."""
from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static


def _key_label(keys: str) -> str:
    names = {"question_mark": "?", "escape": "esc", "ctrl+p": "ctrl+p", "shift+tab": "shift+tab",
             "left_square_bracket": "[", "right_square_bracket": "]"}
    return " / ".join(names.get(k.strip(), k.strip()) for k in keys.split(","))


def key_table(app_bindings: list) -> Table:
    """`app_bindings`: the app's own (the screen passes its app's: importing tui.app here would be a circle)."""
    from tui.screens.chat import ChatScreen
    from tui.screens.data import DataScreen
    from tui.screens.eval import EvalScreen
    from tui.screens.pipeline import PipelineScreen
    from tui.screens.training import TrainingScreen

    table = Table(box=None, show_header=False, padding=(0, 2, 0, 0), expand=True)
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    everywhere = [Binding("ctrl+p", "", "command palette: every action by name"),
                  Binding("tab,shift+tab", "", "focus the next / previous pane (it is tinted)")]
    groups = [("everywhere", list(app_bindings) + everywhere),
              ("pipeline", PipelineScreen.BINDINGS), ("training", TrainingScreen.BINDINGS),
              ("data", DataScreen.BINDINGS), ("eval", EvalScreen.BINDINGS), ("chat", ChatScreen.BINDINGS)]
    for title, bindings in groups:
        if not bindings:
            continue
        table.add_row(Text(title, style="underline"), "")
        for b in bindings:
            b = b if isinstance(b, Binding) else Binding(*b)
            table.add_row(_key_label(b.key), Text(b.description or b.action))
    table.add_row("", "")
    table.add_row(Text("runs", style="underline"), "")
    table.add_row("", Text("A run keeps going when you quit or the connection drops; "
                           "reopen medforge to follow it again."))
    return table


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape,q,question_mark,f1", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Static(Text("medforge keys", style="bold"))
            yield Static(key_table(type(self.app).BINDINGS))

    def action_dismiss(self) -> None:
        self.dismiss()
