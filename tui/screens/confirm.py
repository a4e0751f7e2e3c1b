"""A question before anything expensive or destructive (run all, run a task, forget, stop).

It names what will run or be lost. The safe button has the focus, and no letter answers it: a
sentence typed while no input had focus (enter and space included) can only cancel. To go ahead:
tab or → to the action's button, then enter.
"""
from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Static


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("escape", "answer(False)", "Cancel"),
                Binding("left", "app.focus_previous", show=False), Binding("right", "app.focus_next", show=False)]

    def __init__(self, question: str, details: list[str] | tuple[str, ...] = (), action: str = "Yes"):
        super().__init__()
        self.question, self.details, self.action = question, list(details), action

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm"):
            yield Static(Text(self.question, style="bold"), id="confirm-question")
            if self.details:
                yield Static(Text("\n".join(self.details)), id="confirm-details")
            with Horizontal(id="confirm-buttons"):
                yield Button("Cancel", id="confirm-no")
                yield Button(self.action, id="confirm-yes", variant="warning")
            yield Static(Text("tab or → to choose · enter presses · esc cancels", style="dim"))

    def on_mount(self) -> None:
        self.query_one("#confirm-no", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "confirm-yes")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)
