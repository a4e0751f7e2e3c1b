"""Chat: the base model or any adapter, streamed token by token; side by side, base vs adapter, on one prompt.

Generation runs in a separate process (tui.chat_worker, over stages.chat.stream_chat) so the UI
never slows the decoder; Esc sends it a stop.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import orjson

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import Footer, Input, Static

from tui.messages import ChatDone, ChatToken, RunStateChanged
from tui.widgets.chat_pane import ChatPane, Conversation
from tui.widgets.topbar import TopBar

MAX_TOKENS = 256


class ChatProcess:
    """The dashboard's side of `python -m tui.chat_worker`: started on the first question, ended with the app.

    The UI thread only queues requests (`submit`) and asks for the end (`shut`); neither blocks. A thread
    worker writes the requests (`flush`, which starts the process when needed) and another waits for
    the end (`reap`). Requests are written in the order they were queued, whichever worker gets there
    first: a stop never overtakes the question it stops.
    """

    CLOSE_WAIT_S = 3.0

    def __init__(self, root: Path, post):
        self.root, self.post = root, post
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.pending: set[str] = set()
        self.outbox: collections.deque[dict] = collections.deque()
        self.closed = False

    def ensure(self) -> None:
        """Start the worker process unless it is running. Blocking (a process start): not on the UI thread."""
        if self.proc is not None and self.proc.poll() is None:
            return
        from tui.runner import _pythonpath

        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, "-m", "tui.chat_worker"], cwd=self.root, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr,
                                     env={**os.environ, "PYTHONPATH": _pythonpath()})
        threading.Thread(target=self._read, args=(self.proc,), daemon=True, name="chat-reader").start()

    def submit(self, row: dict) -> None:
        """Queue a request (UI thread; returns at once). `flush` writes it."""
        if row.get("op") == "chat":
            self.pending.add(row["id"])
        self.outbox.append(row)

    def flush(self) -> None:
        """Write every queued request, in order, starting the process first if needed (a worker thread)."""
        with self.lock:
            while self.outbox and not self.closed:
                row = self.outbox.popleft()
                try:
                    self.ensure()
                    self.proc.stdin.write(orjson.dumps(row) + b"\n")
                    self.proc.stdin.flush()
                except (OSError, ValueError) as exc:  # it could not start, or died: the pane waiting says so
                    if row.get("op") == "chat" and row["id"] in self.pending:
                        self.pending.discard(row["id"])
                        self.post(ChatDone(row["id"].split(":")[0], 0, 0.0, error=f"chat process: {exc}"))
        if self.closed:  # shut() came while this held the lock (maybe starting the process): end it here
            with self.lock:
                self._close_input()

    def send(self, row: dict) -> None:
        """Queue and write at once (blocking: from a worker thread or a script, never the UI thread)."""
        self.submit(row)
        self.flush()

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            row = orjson.loads(line)
            pane = row["id"].split(":")[0]
            if "text" in row:
                self.post(ChatToken(pane, row["text"]))
            elif row.get("done"):
                self.pending.discard(row["id"])
                self.post(ChatDone(pane, row["tokens"], row["decode_s"], stopped=row["stopped"],
                                   note=row.get("note", "")))
            elif "error" in row:
                self.pending.discard(row["id"])
                self.post(ChatDone(pane, 0, 0.0, error=row["error"]))
        code = proc.wait()
        self.stderr.seek(0)
        tail = self.stderr.read().decode("utf-8", "replace").strip().splitlines()[-1:]
        if code < 0:  # killed by a signal: a native crash says which CPU, which setting and what to do
            from stages.gguf import crash_line
            reason = crash_line("in the chat process", code)
        else:
            reason = f"chat process ended (exit {code}) {' '.join(tail)}"
        for rid in list(self.pending):  # it died mid-answer: say so in the panes waiting on it
            self.pending.discard(rid)
            self.post(ChatDone(rid.split(":")[0], 0, 0.0, error=reason))

    def _close_input(self) -> None:
        """With the lock held: close the process's input; it stops generating and exits (a close, no wait)."""
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.close()

    def shut(self) -> None:
        """Begin the end, without waiting (the UI thread): nothing more is sent and the process's input closes,
        now or, while a worker writes (or starts the process), when it is done. `reap` waits for the end."""
        self.closed = True
        self.outbox.clear()
        if self.lock.acquire(blocking=False):
            try:
                self._close_input()
            finally:
                self.lock.release()

    def reap(self) -> None:
        """After `shut`: wait up to CLOSE_WAIT_S for the process to exit, then kill it. Blocking: a worker thread."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                proc.wait(timeout=self.CLOSE_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()

    def close(self) -> None:
        """`shut` and `reap` in one (blocking: scripts and worker threads)."""
        self.shut()
        with self.lock:
            self._close_input()
        self.reap()


class ChatScreen(Screen):
    BINDINGS = [
        Binding("ctrl+n", "next_model", "Model"),
        Binding("ctrl+b", "toggle_side", "Side by side"),
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+l", "clear", "Clear"),
        Binding("i", "focus_input", "Type", show=False),  # the bar says it: the footer has no room at 80 columns
    ]

    def __init__(self) -> None:
        super().__init__()
        self.model: str | None = None
        self.side_by_side = False
        self.active: dict[str, str] = {}  # pane -> request id while it answers
        self._ids = itertools.count(1)
        self.chat: ChatProcess | None = None
        self.conversations: dict[str | None, Conversation] = {}  # per model, kept across ctrl+n and ctrl+b

    def compose(self) -> ComposeResult:
        yield TopBar("chat")
        yield Static(id="chat-bar")
        with Horizontal(id="chat-panes"):
            yield ChatPane("left", self.conversations)
            yield ChatPane("right", self.conversations)
        yield Input(placeholder="ask something, enter to send", id="chat-input")
        yield Footer()

    def on_mount(self) -> None:
        self.layout_panes()
        self.query_one("#chat-input").focus()

    def on_screen_resume(self) -> None:
        self.query_one(TopBar).show_run(self.app.running, self.app.run_summary())
        self.layout_panes()

    @on(RunStateChanged)
    def _run_state(self, msg: RunStateChanged) -> None:
        self.query_one(TopBar).show_run(msg.running, msg.summary)

    def models(self) -> list[str | None]:
        """The base, then each adapter (its LoRA GGUF) followed by its merged quants (`<adapter>:q8_0`)."""
        from stages.chat import model_names

        cfg = self.app.cfg
        return [None] + (model_names(cfg) if cfg is not None else [])

    @property
    def generating(self) -> bool:
        return bool(self.active)

    def on_unmount(self) -> None:
        if self.chat is not None:
            self.chat.shut()  # its input closes: the process ends by itself, even if the app is gone first
            # the wait for that (up to ChatProcess.CLOSE_WAIT_S, then a kill) runs in a thread of its own: this
            # happens as the app exits, when Textual cancels workers that have not started yet; not a daemon,
            # so a stuck process is still killed after the app is gone
            threading.Thread(target=self.chat.reap, name="chat-reap").start()
            self.chat = None

    @work(thread=True, group="chat-send", exit_on_error=False)
    def _flush_requests(self) -> None:
        """Write the queued requests (starting the chat process on the first one) off the UI thread."""
        if self.chat is not None:
            self.chat.flush()

    def send(self, row: dict) -> None:
        self.chat.submit(row)
        self._flush_requests()

    def layout_panes(self) -> None:
        left, right = self.query_one("#pane-left", ChatPane), self.query_one("#pane-right", ChatPane)
        if self.side_by_side:
            adapters = [m for m in self.models() if m is not None]
            left.set_model(None)
            right.set_model(self.model if self.model is not None else (adapters[0] if adapters else None))
        else:
            left.set_model(self.model)
        right.display = self.side_by_side
        # one line at 80 columns: the footer names the keys; the bar says what the footer cannot
        bar = Text("model ", style="dim")
        bar.append(left.label if not self.side_by_side else f"{left.label} | {right.label}", style="bold")
        from stages.chat import URL_ENV
        if os.environ.get(URL_ENV):
            bar.append(f" via {os.environ[URL_ENV]}", style="dim")
        bar.append(" · esc leaves the input, i comes back", style="dim")
        self.query_one("#chat-bar", Static).update(bar)

    def action_next_model(self) -> None:
        if self.generating:
            return
        models = self.models()
        i = models.index(self.model) if self.model in models else 0
        self.model = models[(i + 1) % len(models)]
        if self.side_by_side and self.model is None and len(models) > 1:
            self.model = models[1]  # side by side compares the base with an adapter
        self.layout_panes()

    def action_toggle_side(self) -> None:
        if not self.side_by_side and len(self.models()) < 2:
            self.app.notify("side by side compares the base with an adapter: no adapter is configured", markup=False)
            return
        if not self.generating:
            self.side_by_side = not self.side_by_side
            self.layout_panes()

    def action_clear(self) -> None:
        if not self.generating:
            for pane in self.query(ChatPane):
                if pane.display:  # the conversations shown; the other models keep theirs
                    pane.clear()

    def action_stop(self) -> None:
        if self.generating:
            for rid in self.active.values():
                self.send({"op": "stop", "id": rid})
        else:
            self.set_focus(None)  # out of the input, so view keys (1-5, ?, q) work again; i comes back

    def action_focus_input(self) -> None:
        self.query_one("#chat-input").focus()

    @on(Input.Submitted, "#chat-input")
    def _submitted(self, event: Input.Submitted) -> None:
        prompt = event.value.strip()
        if not prompt or self.generating:
            return
        if self.app.cfg is None:
            self.app.notify("the configuration is not loaded (see the pipeline view)", severity="error", markup=False)
            return
        event.input.value = ""
        if self.chat is None:
            self.chat = ChatProcess(self.app.root, self.post_message)
        for pane in [p for p in self.query(ChatPane) if p.display]:
            messages = pane.begin(prompt)
            rid = self.active[pane.pane_id] = f"{pane.pane_id}:{next(self._ids)}"
            self.chat.submit({"op": "chat", "id": rid, "model": pane.model, "messages": messages,
                              "max_tokens": MAX_TOKENS, "temperature": 0.0})
        self._flush_requests()

    @on(ChatToken)
    def _token(self, msg: ChatToken) -> None:
        self.query_one(f"#pane-{msg.pane}", ChatPane).add_tokens(msg.text)

    @on(ChatDone)
    def _done(self, msg: ChatDone) -> None:
        self.active.pop(msg.pane, None)
        self.query_one(f"#pane-{msg.pane}", ChatPane).finish(msg.tokens, msg.seconds, msg.error, msg.stopped,
                                                            msg.note)
