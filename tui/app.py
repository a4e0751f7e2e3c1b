"""The medforge dashboard: pipeline, training, data, eval and chat over one detached doit run.

The App owns the run monitor (one poll worker that re-arms itself, so polls never stack)
and the pipeline state; screens render it. Every slow call runs in a thread worker and
reports back with a typed message.
"""
from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from textual import on, work
from textual.app import App, ScreenStackError
from textual.binding import Binding
from textual.message import Message
from textual.worker import get_current_worker

from stages import layout
from tui.commands import MedforgeCommands
from tui.messages import Notice, PipelineChanged, RunStateChanged
from tui.state import PipelineState
from tui.tail import Follower

if TYPE_CHECKING:
    from stages.lock import Holder

VIEWS = ("pipeline", "training", "data", "eval", "chat")


def _make_screen(view: str):
    import importlib

    module = importlib.import_module(f"tui.screens.{view}")
    return getattr(module, f"{view.capitalize()}Screen")()


@dataclass
class _Polled(Message):
    run: Holder | None  # the run going now, else the last one (the run lock's record)
    alive: bool
    events: list[dict]
    new_run: bool


@dataclass
class _StaticStatus(Message):
    data: dict | None
    error: str = ""
    stamps: dict | None = None  # runner.input_stamps as the view began to be computed


class _InputsChanged(Message):
    """A file doit's static view read (or the configuration) changed while no run was going."""


@dataclass
class _ConfigLoaded(Message):
    cfg: object | None
    error: str = ""


class MedforgeApp(App):
    CSS_PATH = Path(__file__).with_name("app.tcss")  # absolute: subclasses elsewhere find it too
    TITLE = "medforge"
    ENABLE_COMMAND_PALETTE = True
    COMMANDS = App.COMMANDS | {MedforgeCommands}

    BINDINGS = [
        Binding("1", "switch_mode('pipeline')", "Pipeline", show=False),
        Binding("2", "switch_mode('training')", "Training", show=False),
        Binding("3", "switch_mode('data')", "Data", show=False),
        Binding("4", "switch_mode('eval')", "Eval", show=False),
        Binding("5", "switch_mode('chat')", "Chat", show=False),
        Binding("question_mark,f1", "help", "Help"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, root: str | Path = ".", *, poll_s: float = 1.0,
                 memory_probe: Callable[[], object] | None = None, start_view: str = "pipeline", cfg=None):
        # screens are imported when first shown: the first frame does not wait for plotext & co.
        self.MODES = {name: partial(_make_screen, name) for name in VIEWS}
        super().__init__()
        self.root = Path(root).resolve()
        self.poll_s = poll_s
        self.memory_probe = memory_probe
        self.start_view = start_view
        self.pipeline = PipelineState()
        self.cfg = cfg  # run_dashboard has loaded it already; otherwise a worker loads it
        self.config_error = ""
        self.doit_run: Holder | None = None  # the run going now or the last one, whoever started it
        self.running = False
        self._follower: Follower | None = None
        self._follow_key: tuple[int, float] | None = None
        self._poll_timer = None
        self._poll_lock = threading.Lock()  # two overlapping polls must not read the same events twice
        self._polls_failing: set[str] = set()  # polls whose last round raised (each said so once)
        self._polls_failing_lock = threading.Lock()
        self._inputs: list[str] = []  # the files doit's static view read, from its last refresh
        self._stamps: dict | None = None  # and their stamps then; None while a refresh is on its way

    def path(self, relative: Path) -> Path:
        return self.root / relative

    def on_mount(self) -> None:
        self.switch_mode(self.start_view)
        # the first frame comes first: the threads and the doit subprocess would compete with it for the CPU
        self.call_after_refresh(self._start_background)

    def _start_background(self) -> None:
        if self.cfg is None:
            self.load_config()
        else:
            self.broadcast(PipelineChanged())
        self.refresh_static()
        self.poll_run()

    # --- configuration and doit's static view
    @work(thread=True, exclusive=True, group="config", exit_on_error=False)
    def load_config(self) -> None:
        from stages import config

        try:
            self.post_message(_ConfigLoaded(config.load(self.root)))
        except config.ConfigError as exc:
            self.post_message(_ConfigLoaded(None, "; ".join(exc.problems)))

    @on(_ConfigLoaded)
    def _config_loaded(self, msg: _ConfigLoaded) -> None:
        self.cfg, self.config_error = msg.cfg, msg.error
        if msg.error:
            self.notify(f"config: {msg.error}", severity="error", timeout=10, markup=False)
        self.broadcast(PipelineChanged())

    @work(thread=True, exclusive=True, group="static", exit_on_error=False)
    def refresh_static(self) -> None:
        from tui import runner

        stamps = runner.input_stamps(self.root, self._inputs)  # before: an edit made meanwhile is seen next poll
        try:
            self.post_message(_StaticStatus(runner.static_status(self.root), stamps=stamps))
        except Exception as exc:  # shown in the pipeline view; the dashboard stays usable
            self.post_message(_StaticStatus(None, str(exc), stamps))

    @on(_StaticStatus)
    def _static_status(self, msg: _StaticStatus) -> None:
        if msg.data is not None:
            self.pipeline.apply_static(msg.data)
            self._inputs = msg.data.get("inputs", [])
        else:
            self.pipeline.static_error = msg.error
        self._stamps = msg.stamps
        self.broadcast(PipelineChanged())

    @on(_InputsChanged)
    def _inputs_changed(self) -> None:
        """An input or the configuration was edited (a recipe, a source's file, code): doit's view is re-read now,
        not at the end of the next run, so "up to date" stays true."""
        if self._stamps is None or self.running:
            return
        self._stamps = None
        self.load_config()
        self.refresh_static()

    # --- the run monitor: one poll at a time, re-armed when its result is handled
    @work(thread=True, exclusive=True, group="run-poll", exit_on_error=False)
    def poll_run(self) -> None:
        try:
            with self._poll_lock:
                self._poll_once()
            self.poll_ok("run monitor")
        except Exception as exc:  # a bad record or events file, a race with a writer: said once, polled again
            self.poll_failed("run monitor", exc)
            if not get_current_worker().is_cancelled:
                self.call_from_thread(self.schedule_poll, self.poll_s)  # _polled re-arms it when a poll succeeds

    def _poll_once(self) -> None:
        from stages import lock
        from tui import runner

        # the run lock says who runs now (a shell, CI, a dashboard), else who ran last and where its events begin
        going = runner.current_run(self.root)
        run = going or lock.last(self.root)
        new_run = run is not None and (run.pid, run.started) != self._follow_key
        events_path = self.path(layout.events_file())
        if new_run:
            self._follower = Follower(events_path, run.events_offset)
            self._follow_key = (run.pid, run.started)
        elif self._follower is None:  # no run ever took the lock here: follow from now on
            self._follower = Follower(events_path, events_path.stat().st_size if events_path.exists() else 0)
        events = self._follower.read_json()
        if run is not None:
            events = [e for e in events if e.get("pid") == run.pid]
        self.post_message(_Polled(run, going is not None, events, new_run))
        stamps = self._stamps
        if going is None and stamps is not None and runner.input_stamps(self.root, self._inputs) != stamps:
            self.post_message(_InputsChanged())

    @on(_Polled)
    def _polled(self, msg: _Polled) -> None:
        was_running = self.running
        self.doit_run, self.running = msg.run, msg.alive
        self.pipeline.run_active = msg.alive
        changed = self.pipeline.apply_events(msg.events) or msg.new_run
        if not msg.alive and (was_running or msg.new_run):
            if self.pipeline.run_summary.startswith("running"):  # gone without a run_end: killed
                self.pipeline.run_died()
            self._stamps = None  # what the run wrote is no edit to react to: the view is re-read now anyway
            self.refresh_static()  # doit wrote its dep DB at the end of the run
        if changed or was_running != msg.alive:
            self.broadcast(PipelineChanged())
            self.broadcast(RunStateChanged(msg.alive, self.run_summary()))
        self.schedule_poll(self.poll_s)

    # --- polls keep going through errors (any worker thread)
    def poll_failed(self, name: str, exc: BaseException) -> None:
        """A poll raised: say so once (plain text) until it works again; the caller re-arms it as usual."""
        with self._polls_failing_lock:
            first = name not in self._polls_failing
            self._polls_failing.add(name)
        if first:
            detail = str(exc).splitlines()[0] if str(exc) else ""
            self.post_message(Notice(f"{name}: {type(exc).__name__}{': ' + detail if detail else ''} "
                                     "(still polling)", error=True))

    def poll_ok(self, name: str) -> None:
        if self._polls_failing:
            with self._polls_failing_lock:
                self._polls_failing.discard(name)

    def schedule_poll(self, delay: float) -> None:
        if self._poll_timer is not None:
            self._poll_timer.stop()
        self._poll_timer = self.set_timer(max(delay, 0.01), self.poll_run)  # textual timers need a delay > 0

    def run_summary(self) -> str:
        if self.doit_run is None:
            return "no run yet"
        if self.running:
            tasks = self.pipeline.running_tasks()
            doing = "running " + (", ".join(tasks) if tasks else "(loading the task graph)")
            return f"{doing} · {self.doit_run.describe()}"
        return self.pipeline.run_summary or "last run finished"

    def broadcast(self, message: Message) -> None:
        """Hand a state message to the visible screen (others refresh when shown)."""
        try:
            screen = self.screen
        except ScreenStackError:  # a worker's result that lands as the app closes: no screen left to tell
            return
        screen.post_message(message)

    # --- actions on the pipeline
    @work(thread=True, exclusive=True, group="run-action", exit_on_error=False)
    def start_run(self, tasks: list[str]) -> None:
        from tui import runner

        try:
            holder = runner.start(self.root, tasks)
            self.post_message(Notice(f"started {holder.describe()}"))
        except runner.StageError as exc:
            self.post_message(Notice(str(exc), error=True))
        self.call_from_thread(self.poll_now)

    @work(thread=True, exclusive=True, group="run-action", exit_on_error=False)
    def stop_run(self) -> None:
        from tui import runner

        self.post_message(Notice(runner.stop(self.root)))
        self.call_from_thread(self.poll_now)

    @work(thread=True, exclusive=True, group="run-action", exit_on_error=False)
    def forget_tasks(self, tasks: list[str]) -> None:
        from tui import runner

        try:
            self.post_message(Notice(runner.forget(self.root, tasks)))
        except Exception as exc:
            self.post_message(Notice(str(exc), error=True))
        self.call_from_thread(self.refresh_static)

    def poll_now(self) -> None:
        self.schedule_poll(0)

    @on(Notice)
    def _notice(self, msg: Notice) -> None:
        # the text can carry doit's stderr, a config value or a path: shown as it is, never read as markup
        self.notify(msg.text, severity="error" if msg.error else "information", timeout=8 if msg.error else 4,
                    markup=False)

    def action_help(self) -> None:
        from tui.screens.help import HelpScreen

        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())


def _exit_on_hangup(app: MedforgeApp) -> None:
    """When the terminal goes away (SSH dropped), leave cleanly instead of spinning; the run goes on."""
    def handler(signum, frame):
        app.call_later(app.exit) if app.is_running else sys.exit(0)
    signal.signal(signal.SIGHUP, handler)


def run_dashboard(root: str | Path = ".") -> int:
    from stages import config

    cfg = config.load(root)  # a broken config is one clear error before the screen opens
    app = MedforgeApp(root, cfg=cfg)
    _exit_on_hangup(app)
    app.run()
    return 0
