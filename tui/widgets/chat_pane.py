"""One conversation with one model: a read-only transcript that grows as tokens stream in.

Each model keeps its own conversation (the chat screen holds them, shared by both panes): switching the
model shows that model's conversation where it was left, so the same question can be put to each model
and their answers read again. The transcript is plain text only, so nothing a model says is read as markup.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from tui.widgets.transcript import Transcript


@dataclass
class Conversation:
    """One model's conversation: the turns sent to it, the transcript as shown and its last status."""
    history: list[dict] = field(default_factory=list)
    text: str = ""
    status: str = ""


class ChatPane(Vertical):
    def __init__(self, pane_id: str, conversations: dict[str | None, Conversation] | None = None):
        super().__init__(id=f"pane-{pane_id}", classes="chat-pane")
        self.pane_id = pane_id
        self.model: str | None = None      # None = the base model, else an adapter name
        self.conversations = conversations if conversations is not None else {}
        self.conversation = self.conversations.setdefault(None, Conversation())
        self.reply: list[str] = []

    @property
    def history(self) -> list[dict]:
        return self.conversation.history

    @property
    def status(self) -> str:
        return self.conversation.status

    @status.setter
    def status(self, value: str) -> None:
        self.conversation.status = value

    def compose(self) -> ComposeResult:
        yield Static(classes="pane-title")
        yield Transcript(classes="transcript")

    def on_mount(self) -> None:
        self.show_title()

    @property
    def label(self) -> str:
        return self.model or "base model"

    def set_model(self, model: str | None) -> None:
        """Show `model`'s conversation, as it was left (a new model starts empty)."""
        if model != self.model:
            self.model = model
            self.conversation = self.conversations.setdefault(model, Conversation())
            transcript = self.query_one(Transcript)
            transcript.clear()
            transcript.append(self.conversation.text)
            self.show_title()

    def show_title(self) -> None:
        title = Text(self.label, style="bold cyan")
        if self.status:
            title.append(f"  {self.status}", style="dim")
        self.query_one(".pane-title", Static).update(title)

    def clear(self) -> None:
        """Forget this model's conversation (the others are kept)."""
        self.conversation.history.clear()
        self.conversation.text = self.conversation.status = ""
        self.reply = []
        self.query_one(Transcript).clear()
        self.show_title()

    def _append(self, text: str) -> None:
        self.conversation.text += text
        self.query_one(Transcript).append(text)

    def begin(self, prompt: str) -> list[dict]:
        """Show the user's turn and return the conversation to send."""
        self.history.append({"role": "user", "content": prompt})
        self.reply = []
        lead = "" if self.query_one(Transcript).text == "" else "\n\n"
        self._append(f"{lead}> {prompt}\n\n")
        self.status = "thinking…"
        self.show_title()
        return list(self.history)

    def add_tokens(self, text: str) -> None:
        if not self.reply:
            self.status = "answering…"
            self.show_title()
        self.reply.append(text)
        self._append(text)

    def finish(self, tokens: int, decode_s: float, error: str = "", stopped: bool = False, note: str = "") -> None:
        answer = "".join(self.reply)
        if answer:
            self.history.append({"role": "assistant", "content": answer})
        else:
            self.history.pop()  # no answer: the question is not part of the conversation
        if error:
            self._append(f"[error] {error}")
            self.status = "error"
        else:
            rate = f"{(tokens - 1) / decode_s:.1f} tok/s" if tokens > 1 and decode_s > 0 else ""
            self.status = ("stopped · " if stopped else "") + f"{tokens} tokens" + (f" · {rate}" if rate else "")
            if note:
                self._append(f"\n[{note}]")
        self.show_title()
